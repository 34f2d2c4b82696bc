// Setting a region up (backing, userfaultfd, workers and their channels)
// and tearing it down; stats and progress. What each worker does lives in
// handler.cc, puller.cc and reads.cc.
#include "runtime/fault_engine.h"

#include <sys/eventfd.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <mutex>

#include "runtime/uffd_compat.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

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

// Every feature the engine asks for: refusal, prefetch by thread, minor
// faults for shared memory, and the munmap / mremap events that tell it
// when part of the region stops being the region's.
uint64_t wanted_features(const Backing& b) {
  return UFFD_FEATURE_POISON | UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_EVENT_UNMAP |
         UFFD_FEATURE_EVENT_REMAP | minor_features(b) | (b.huge ? UFFD_FEATURE_EXACT_ADDRESS : 0);
}

// The prefetch window in this side's pages: given in 4 KiB pages, and two
// 2 MiB pages at most.
uint32_t prefetch_window(const AttachOptions& o, uint32_t page_size) {
  const uint32_t pages = std::max(1u, o.prefetch_max_pages);
  return page_size == kSmallPage ? pages : std::min(pages, 2u);
}

// A bounded cache: what it needs of the region and the options.
void check_cache(const AttachOptions& o, const Transport& t, const Backing& b, uint32_t page_size) {
  if (o.cache_bytes == 0) return;
  if (b.shared || b.huge) {
    throw Error(Errc::kInvalidArgument, "a bounded cache (cache_bytes) needs anonymous memory in 4 KiB pages");
  }
  if (o.precopy.enabled) throw Error(Errc::kInvalidArgument, "a bounded cache cannot take a precopy migration");
  if (o.cache_bytes < 16 * uint64_t{page_size}) {
    throw Error(Errc::kInvalidArgument, "a bounded cache of " + std::to_string(o.cache_bytes) +
                                            " bytes is too small: at least 16 pages (" +
                                            std::to_string(16 * page_size) + " bytes)");
  }
  if (t.region().lease == 0) {
    throw Error(Errc::kInvalidArgument, "a bounded cache writes written pages back to a memory node: the region '" +
                                            t.region().name + "' was not opened as the node's writer");
  }
}

void check_supported(const Transport& t, const Backing& b, const Userfaultfd& uffd) {
  if (t.region().page_size != kSmallPage) {
    throw Error(Errc::kInvalidArgument,
                "source page size " + std::to_string(t.region().page_size) + " is not supported (4096 only)");
  }
  static std::once_flag features_logged;
  std::call_once(features_logged, [&uffd] {
    spdlog::info("uffd: kernel offers [{}]; refusing unfetchable pages with {}; munmap of part of a region {}",
                 describe_uffd_features(Userfaultfd::kernel_features()),
                 uffd.has(UFFD_FEATURE_POISON) ? "UFFDIO_POISON (SIGBUS)" : "PROT_NONE (SIGSEGV)",
                 uffd.has(UFFD_FEATURE_EVENT_UNMAP) ? "seen (UFFD_EVENT_UNMAP)" : "not seen (no UFFD_EVENT_UNMAP)");
  });
  if (b.shared && !uffd.has(minor_features(b))) {
    throw Error(Errc::kUffdUnavailable, std::string("this kernel has no minor faults on ") +
                                            (b.huge ? "hugetlbfs" : "shared memory") + " (UFFD_FEATURE_MINOR_" +
                                            (b.huge ? "HUGETLBFS" : "SHMEM") +
                                            "): attach with anonymous memory instead");
  }
}

Backing make_backing(const Transport& t, const AttachOptions& o, ForeignMemory* foreign) {
  if (foreign == nullptr) return Backing::create(t.region().length, o);
  return Backing::foreign_memory(foreign->pid, foreign->pidfd, std::move(foreign->segments), t.region().length,
                                 foreign->page_size, foreign->memfd.get());
}

Userfaultfd make_uffd(const Backing& b, ForeignMemory* foreign) {
  if (foreign == nullptr) return Userfaultfd::open(wanted_features(b));
  // The features the other process negotiated are its fdinfo's; whether
  // the kernel poisons pages (no negotiating needed) and has minor faults
  // (its ranges were found registered for them where it shares memory) is
  // asked here too. A userfaultfd cannot be opened here when this process
  // may not, and then nothing more is assumed.
  uint64_t assumed = 0;
  try {
    assumed = Userfaultfd::kernel_features() & (UFFD_FEATURE_POISON | minor_features(b));
  } catch (const std::exception&) {
  }
  return Userfaultfd::adopt(std::move(foreign->uffd), assumed);
}

}  // namespace

FaultEngine::FaultEngine(std::unique_ptr<Transport> transport, const AttachOptions& options, const ZeroMap* not_zero)
    : FaultEngine(std::move(transport), options, not_zero, nullptr) {}

FaultEngine::FaultEngine(std::unique_ptr<Transport> transport, const AttachOptions& options, ForeignMemory foreign)
    : FaultEngine(std::move(transport), options, nullptr, &foreign) {}

FaultEngine::FaultEngine(std::unique_ptr<Transport> transport, const AttachOptions& options, const ZeroMap* not_zero,
                         ForeignMemory* foreign)
    : options_(options),
      transport_(std::move(transport)),
      backing_(make_backing(*transport_, options, foreign)),
      desc_(local_descriptor(transport_->region(), backing_.page_size())),
      uffd_(make_uffd(backing_, foreign)),
      pages_(backing_.bytes() / desc_.page_size),
      streams_(prefetch_window(options, desc_.page_size)),
      stop_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
      started_(std::chrono::steady_clock::now()),
      status_(desc_.name),
      residency_(backing_, desc_.page_size, pages_.size()),
      refusal_(uffd_, pages_, status_, backing_, desc_.page_size, desc_.name) {
  if (!stop_fd_) throw_errno("eventfd");
  check_supported(*transport_, backing_, uffd_);
  if (options_.poll_us > 1000000) {
    throw Error(Errc::kInvalidArgument, "poll_us " + std::to_string(options_.poll_us) +
                                            " is absurd: a handler spins at most 1000000 us (1 s) before it sleeps");
  }
  const unsigned handlers = options_.handler_threads != 0 ? options_.handler_threads : default_handler_threads();
  if (backing_.foreign()) {
    set_up_foreign_memory();
  } else {
    check_cache(options_, *transport_, backing_, desc_.page_size);
    set_up_own_memory(not_zero, handlers);
  }
  start_workers(handlers);
}

void FaultEngine::set_up_own_memory(const ZeroMap* not_zero, unsigned handlers) {
  if (options_.cache_bytes > 0) {
    // Far memory: the region is never all here, so nothing pulls it whole.
    options_.background_pull = false;
    // Evicting single pages out of a transparent huge page would split it
    // each time; keep the region at 4 KiB.
    if (::madvise(backing_.view.data(), backing_.view.size(), MADV_NOHUGEPAGE) != 0) {
      throw_errno("madvise(MADV_NOHUGEPAGE)");
    }
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
  name_view();
  if (options_.uffd_per_handler) uffd_.split(backing_.view.data(), backing_.view.size(), handlers, desc_.page_size);
  if (options_.cache_bytes > 0) {
    uffd_.register_missing_and_wp(backing_.view.data(), backing_.view.size());
  } else {
    uffd_.register_range(backing_.view.data(), backing_.view.size(), backing_.shared);
  }
  backing_.populate();
  if ((backing_.huge && !backing_.shared) || options_.cache_bytes > 0) {
    zero_source_ = Mapping::anonymous(desc_.page_size, PROT_READ);
  }
  if (not_zero != nullptr) {
    for (size_t p = 0; p < pages_.size(); ++p) {
      if (written_here(*not_zero, p)) clear_zero_page(desc_.zero_map, p);
    }
  }
}

void FaultEngine::set_up_foreign_memory() {
  // The other process registered its ranges (for missing faults, or minor
  // faults for shared memory) before it handed the userfaultfd over.
  if (options_.cache_bytes > 0 || options_.precopy.enabled || options_.memory != AttachOptions::Memory::kAnonymous) {
    throw Error(Errc::kInvalidArgument,
                "another process's memory is served as it mapped it (anonymous, or shared memory from the memfd it "
                "sent), with no bounded cache and no precopy");
  }
  removed_.assign((pages_.size() + 63) / 64, 0);
  if (backing_.shared) {
    // Its memfd: allocated now (see Backing::populate), and out of any
    // child of this process.
    if (::madvise(backing_.alias.data(), backing_.alias.size(), MADV_DONTFORK) != 0) {
      throw_errno("madvise(MADV_DONTFORK)");
    }
    backing_.populate();
  }
  if (backing_.huge) zero_source_ = Mapping::anonymous(desc_.page_size, PROT_READ);
}

std::unique_ptr<Worker> FaultEngine::make_worker(unsigned index, uint32_t slots, uint32_t slot_pages, ChannelUse use) {
  const uint32_t max_run = std::clamp<uint32_t>(transport_->capabilities().max_read_bytes / desc_.page_size, 1,
                                                kMaxRunPages);
  auto w = std::make_unique<Worker>();
  w->index = index;
  w->slot_pages = std::min(slot_pages, max_run);
  w->channel = transport_->open_channel(use);
  // Shared memory: reads land in the final pages, through the alias.
  if (backing_.shared) w->channel->register_buffer(backing_.alias.data(), backing_.alias.size());
  w->staging = std::make_unique<StagingPool>(*w->channel, slots, backing_.shared ? 0 : w->slot_pages * desc_.page_size);
  w->slots.resize(slots);
  w->batch.reserve(slots);
  w->channel->watch(stop_fd_.get(), kStopToken, WatchRole::kStop);  // also ends a reconnect
  return w;
}

void FaultEngine::start_workers(unsigned n) {
  const TransportCapabilities caps = transport_->capabilities();
  if (caps.max_read_bytes < desc_.page_size) {
    throw Error(Errc::kInvalidArgument, "this transport reads at most " + std::to_string(caps.max_read_bytes) +
                                            " bytes at once: too little for " + std::to_string(desc_.page_size >> 10) +
                                            " KiB pages");
  }
  // Staging for 2 MiB pages is kept to a few pages a worker, and a demand
  // read of one may go out as two (its faulting 4 KiB first).
  const uint32_t max_depth = backing_.huge ? (backing_.shared ? std::max(1u, caps.max_outstanding_reads / 2) : 8)
                                           : caps.max_outstanding_reads;
  const uint32_t depth = std::clamp<uint32_t>(options_.queue_depth, 1, max_depth);
  // Runs and prefetch windows are given in 4 KiB pages; in 2 MiB pages
  // they come to one page (a run) and two (a window).
  const uint32_t small_per_page = desc_.page_size / kSmallPage;
  // Channels are opened here so that a connection failure surfaces from
  // attach() as an exception rather than inside a thread.
  for (unsigned i = 0; i < n; ++i) {
    auto h = make_worker(i, depth, options_.prefetch ? prefetch_window(options_, desc_.page_size) : 1,
                         ChannelUse::kDemand);
    h->part = i % uffd_.parts();
    h->channel->watch(uffd_.fd(h->part), kUffdToken);
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
  completion_ = std::make_unique<Completion>(
      Completion::Region{pages_, residency_, uffd_, backing_, desc_.page_size, status_, desc_.name, started_,
                         removed_.empty() ? nullptr : &removed_},
      n + 3);
  // Slot n + 1 counts for precopy, which takes pages back between rounds,
  // and n + 2 for the cache's eviction.
  if (options_.precopy.enabled) completion_->hold(true);
  if (options_.cache_bytes > 0) {
    // Never complete: pages keep going and coming back.
    completion_->hold(true);
    Completion* c = completion_.get();
    cache_ = std::make_unique<Cache>(
        Cache::Region{pages_, uffd_, backing_.view.data(), desc_.page_size, desc_.length, desc_.zero_map, status_,
                      desc_.name, residency_, completion_->slot(n + 2), [c] { return c->pages_present(); }},
        *transport_, options_, stop_fd_.get());
  }
  for (auto& h : handlers_) h->counts = &completion_->slot(h->index);
  if (puller_) puller_->counts = &completion_->slot(n);
  if (backing_.foreign()) {
    // Source pages in none of the other process's ranges are not the
    // region's: gone from the start (slot n + 1, precopy's, is free here).
    size_t next = 0;
    int64_t outside = 0;
    const auto gone_until = [&](size_t end) {
      for (; next < end; ++next) outside += pages_.transition(next, PageState::kMissing, PageState::kGone) ? 1 : 0;
    };
    for (const Segment& seg : backing_.segments) {
      gone_until(seg.first_page);
      next = seg.first_page + seg.pages;
    }
    gone_until(pages_.size());
    PageCounts::add(completion_->slot(n + 1).gone, outside);
  }
  for (auto& h : handlers_) {
    Worker* raw = h.get();
    raw->thread = std::thread([this, raw] { run_handler(*raw); });
  }
  if (puller_) puller_->thread = std::thread([this] { run_puller(*puller_); });
  if (cache_) cache_->start();
  completion_->start(stop_fd_.get());
  spdlog::info("attach: '{}' over {}: {} MiB in {} KiB pages of {} ({} zero pages known), {} handler threads{}, {} "
               "reads in flight each, pull {}, prefetch {}{}",
               desc_.name, transport_->name(), desc_.length >> 20, desc_.page_size >> 10,
               backing_.foreign() ? fmt::format("process {}'s {} ({} ranges)", backing_.foreign_pid,
                                                backing_.shared ? "shared memory, installed in place" : "memory",
                                                backing_.segments.size())
               : backing_.shared  ? (backing_.huge ? "hugetlbfs shared memory, installed in place"
                                                   : "shared memory, installed in place")
                                  : (backing_.huge ? "anonymous hugetlb memory" : "anonymous memory"),
               count_zero_pages(desc_.zero_map), n,
               uffd_.parts() > 1 ? fmt::format(" ({} userfaultfds, one each)", uffd_.parts()) : std::string(), depth,
               puller_ ? "on" : "off", options_.prefetch ? "on" : "off",
               cache_ ? fmt::format(", cache {} MiB ({}; written pages tracked by write-protect faults)",
                                    options_.cache_bytes >> 20,
                                    options_.eviction == AttachOptions::Eviction::kClock ? "clock" : "fifo")
                      : std::string());
}

FaultEngine::~FaultEngine() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(stop_fd_.get(), &one, sizeof one);
  if (cache_) cache_->stop();  // frees handlers waiting for room
  if (puller_ && puller_->thread.joinable()) puller_->thread.join();
  for (auto& h : handlers_) {
    if (h->thread.joinable()) h->thread.join();
  }
  if (completion_) completion_->join();
  // Threads may still be parked on pages that never arrived (or that were
  // discarded after they arrived, though the table calls them present).
  // Closing the uffd would let them in to zero-filled memory, so the region
  // is made inaccessible first and they are woken into SIGSEGV instead.
  if (!status_.complete()) {
    read_unmap_events_left();
    refusal_.make_inaccessible();
  }
  puller_.reset();
  handlers_.clear();  // channels drain their in-flight reads before staging memory goes
  // Closed before anything is unmapped: with munmap events on, an unmap
  // waits until somebody reads its event, and nobody is left to.
  uffd_.close();
  if (!backing_.foreign()) unmap_view();
}

Stats FaultEngine::stats() const {
  std::vector<const Metrics*> parts;
  for (const auto& h : handlers_) parts.push_back(&h->metrics);
  if (puller_) parts.push_back(&puller_->metrics);
  Stats s = merge_metrics(parts);
  s.pages_total = pages_.size();
  s.pages_present = completion_->pages_present();
  s.pages_unmapped = completion_->pages_gone();
  s.complete = status_.complete();
  if (cache_) cache_->add_stats(s);
  for (const auto& h : handlers_) s.reconnects += h->channel->reconnects();
  if (puller_) s.reconnects += puller_->channel->reconnects();
  return s;
}

FlushReport FaultEngine::flush() {
  if (!cache_) throw Error(Errc::kInvalidArgument, "flush: region '" + desc_.name + "' has no bounded cache");
  return cache_->flush();
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
  p.failed = status_.failed();
  return p;
}

}  // namespace pagewire
