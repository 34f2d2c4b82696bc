#include "runtime/fault_engine.h"

#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

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

size_t round_up(size_t v, size_t to) { return (v + to - 1) / to * to; }

unsigned default_handlers() {
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  return static_cast<unsigned>(std::clamp<long>(cpus, 1, 4));
}

}  // namespace

struct FaultEngine::Handler {
  struct SlotInfo {
    size_t page = 0;
    uint64_t start_ns = 0;
    bool busy = false;
  };

  unsigned index = 0;
  // The staging memory outlives the channel, which drains the reads still
  // landing in it when it is destroyed.
  std::unique_ptr<StagingPool> staging;
  std::unique_ptr<Channel> channel;
  std::vector<SlotInfo> slots;
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
      desc_(transport_->region()),
      region_(Mapping::anonymous(round_up(desc_.length, desc_.page_size))),
      uffd_(Userfaultfd::open(UFFD_FEATURE_POISON | UFFD_FEATURE_EVENT_REMOVE)),
      pages_(region_.size() / desc_.page_size),
      stop_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  if (!stop_fd_) throw_errno("eventfd");
  if (desc_.page_size != 4096) {
    throw Error(Errc::kInvalidArgument, "page size " + std::to_string(desc_.page_size) +
                                            " is not supported yet (4096 only)");
  }
  static std::once_flag features_logged;
  std::call_once(features_logged, [this] {
    spdlog::info("uffd: kernel offers [{}]; refusing unfetchable pages with {}",
                 describe_uffd_features(Userfaultfd::kernel_features()),
                 uffd_.has(UFFD_FEATURE_POISON) ? "UFFDIO_POISON (SIGBUS)" : "PROT_NONE (SIGSEGV)");
  });
  // A child forked later would see zero-filled memory where pages were
  // still missing (its copy is not registered): keep the region out of it.
  if (::madvise(region_.data(), region_.size(), MADV_DONTFORK) != 0) throw_errno("madvise(MADV_DONTFORK)");
  uffd_.register_missing(region_.data(), region_.size());

  const unsigned n = options_.handler_threads != 0 ? options_.handler_threads : default_handlers();
  const TransportCapabilities caps = transport_->capabilities();
  const uint32_t depth = std::clamp<uint32_t>(options_.queue_depth, 1, caps.max_outstanding_reads);
  // Channels are opened here so that a connection failure surfaces from
  // attach() as an exception rather than inside a thread.
  for (unsigned i = 0; i < n; ++i) {
    auto h = std::make_unique<Handler>();
    h->index = i;
    h->channel = transport_->open_channel();
    h->staging = std::make_unique<StagingPool>(*h->channel, depth, desc_.page_size);
    h->slots.resize(depth);
    h->batch.reserve(depth);
    h->channel->watch(uffd_.fd(), kUffdToken);
    h->channel->watch(stop_fd_.get(), kStopToken);
    handlers_.push_back(std::move(h));
  }
  for (auto& h : handlers_) {
    Handler* raw = h.get();
    raw->thread = std::thread([this, raw] { run_handler(*raw); });
  }
  spdlog::info("attach: '{}' over {}: {} MiB, {} handler threads, {} reads in flight each", desc_.name,
               transport_->name(), desc_.length >> 20, n, depth);
}

FaultEngine::~FaultEngine() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(stop_fd_.get(), &one, sizeof one);
  for (auto& h : handlers_) {
    if (h->thread.joinable()) h->thread.join();
  }
  // Threads may still be parked on pages that never arrived. Closing the
  // uffd would let them in to zero-filled memory, so the region is made
  // inaccessible first and they are woken into SIGSEGV instead.
  size_t missing = 0;
  for (size_t p = 0; p < pages_.size(); ++p) missing += pages_.get(p) != PageState::kPresent;
  if (missing > 0) {
    ::mprotect(region_.data(), region_.size(), PROT_NONE);
    uffd_.wake(region_.data(), region_.size());
  }
  handlers_.clear();  // channels drain their in-flight reads before staging memory goes
}

Stats FaultEngine::stats() const {
  std::vector<const Metrics*> parts;
  for (const auto& h : handlers_) parts.push_back(&h->metrics);
  Stats s = merge_metrics(parts);
  s.pages_total = pages_.size();
  s.pages_present = s.pages_fetched - s.install_failures;
  for (const auto& h : handlers_) s.reconnects += h->channel->reconnects();
  return s;
}

std::string FaultEngine::error() const {
  std::lock_guard lock(error_mu_);
  return error_;
}

void FaultEngine::record_failure(const std::string& text) {
  std::lock_guard lock(error_mu_);
  if (error_.empty()) {
    error_ = text;
    spdlog::error("region '{}': {}", desc_.name, text);
  }
  failed_.store(true);
}

void FaultEngine::run_handler(Handler& h) {
  const std::string thread_name = "pw-fault-" + std::to_string(h.index);
  ::pthread_setname_np(::pthread_self(), thread_name.c_str());
  if (options_.handler_cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(options_.handler_cpu, &set);
    ::pthread_setaffinity_np(::pthread_self(), sizeof set, &set);
  }
  try {
    for (;;) {
      h.result.clear();
      // Do not sleep while the uffd may still hold events we could take,
      // and do not wake for it while there is no slot to take them into.
      const bool can_read = h.uffd_ready && !h.staging->empty();
      h.channel->pause_watch(kUffdToken, h.staging->empty());
      h.channel->wait(h.result, can_read ? 0 : -1);
      for (uint64_t token : h.result.woken_tokens) {
        if (token == kStopToken) return;
        if (token == kUffdToken) h.uffd_ready = true;
      }
      for (const ReadCompletion& c : h.result.completions) complete(h, c);
      if (h.result.channel_error != Errc::kOk) record_failure(h.result.channel_error_text);
      if (h.uffd_ready && !h.staging->empty()) read_faults(h);
    }
  } catch (const std::exception& e) {
    // Nothing may escape a thread; the region is marked failed instead,
    // and the pages this handler owned are refused: nobody else would ever
    // install them, and their waiters would stay parked.
    const std::string why = std::string("fault handler stopped: ") + e.what();
    record_failure(why);
    for (size_t slot = 0; slot < h.slots.size(); ++slot) {
      if (!h.slots[slot].busy) continue;
      h.slots[slot].busy = false;
      refuse_page(h, h.slots[slot].page, Errc::kIo, why);
    }
  }
}

void FaultEngine::read_faults(Handler& h) {
  h.batch.clear();
  while (!h.staging->empty()) {
    const size_t want = std::min<size_t>(kEventBatch, h.staging->available());
    const int n = uffd_.read_events(std::span(h.events.data(), want));
    if (n < 0) {
      record_failure(std::string("reading userfaultfd: ") + std::strerror(-n));
      h.uffd_ready = false;
      break;
    }
    const uint64_t t0 = now_ns();
    for (int i = 0; i < n; ++i) {
      const uffd_msg& msg = h.events[static_cast<size_t>(i)];
      if (msg.event == UFFD_EVENT_REMOVE) {
        forget_pages(msg.arg.remove.start, msg.arg.remove.end);
        continue;
      }
      if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
      Metrics::bump(h.metrics.faults);
      const uint64_t offset = (msg.arg.pagefault.address - reinterpret_cast<uint64_t>(region_.data())) &
                              ~uint64_t{desc_.page_size - 1};
      const size_t page = offset / desc_.page_size;
      std::byte* addr = region_.data() + offset;
      if (!pages_.claim(page)) {
        Metrics::bump(h.metrics.duplicate_faults);
        // IN_FLIGHT: the owner's UFFDIO_COPY will wake this thread too.
        // PRESENT: the copy raced with the fault; wake it ourselves.
        // REFUSED: refused pages were poisoned or protected already.
        const PageState s = pages_.get(page);
        if (s == PageState::kPresent) uffd_.wake(addr, desc_.page_size);
        if (s == PageState::kRefused) uffd_.refuse(addr, desc_.page_size);
        continue;
      }
      const uint32_t slot = h.staging->acquire();
      h.slots[slot] = {page, t0, true};
      // The last page of a region whose length is not page aligned is read
      // short; the rest of it lies past the end of the source and reads zero.
      const uint64_t len = std::min<uint64_t>(desc_.page_size, desc_.length - offset);
      h.batch.push_back({offset, static_cast<uint32_t>(len), h.staging->at(slot), slot});
    }
    if (static_cast<size_t>(n) < want) {
      h.uffd_ready = false;
      break;
    }
  }
  if (!h.batch.empty()) h.channel->post(h.batch);
}

void FaultEngine::complete(Handler& h, const ReadCompletion& c) {
  const auto slot = static_cast<uint32_t>(c.cookie);
  const Handler::SlotInfo info = h.slots[slot];
  h.slots[slot].busy = false;
  std::byte* addr = region_.data() + info.page * desc_.page_size;
  if (c.status != Errc::kOk) {
    h.staging->release(slot);
    refuse_page(h, info.page, c.status, h.result.channel_error_text);
    return;
  }
  std::byte* src = h.staging->at(slot);
  const uint64_t offset = info.page * desc_.page_size;
  const uint64_t len = std::min<uint64_t>(desc_.page_size, desc_.length - offset);
  if (len < desc_.page_size) std::memset(src + len, 0, desc_.page_size - len);
  // Counted before the copy: the copy wakes the faulting threads, and what
  // they read in stats() afterwards must include their page.
  Metrics::bump(h.metrics.pages_fetched);
  Metrics::bump(h.metrics.bytes_fetched, len);
  uint64_t retries = 0;
  const int rc = uffd_.copy(addr, src, desc_.page_size, &retries);
  h.staging->release(slot);
  if (retries > 0) Metrics::bump(h.metrics.copy_retries, retries);
  if (rc == 0 || rc == EEXIST) {
    pages_.set(info.page, PageState::kPresent);
    if (rc == EEXIST) Metrics::bump(h.metrics.copy_eexist);
    h.metrics.fault_latency.record(now_ns() - info.start_ns);
    return;
  }
  Metrics::bump(h.metrics.install_failures);
  refuse_page(h, info.page, Errc::kIo, std::string("UFFDIO_COPY: ") + std::strerror(rc));
}

void FaultEngine::forget_pages(uint64_t start, uint64_t end) {
  // MADV_DONTNEED (or REMOVE) zapped these pages: the next touch faults
  // again and fetches them from the source again, as postcopy expects of a
  // discarded page. Pages in flight are left to their fetch; refused pages
  // stay refused.
  const uint64_t base = reinterpret_cast<uint64_t>(region_.data());
  start = std::max(start, base);
  end = std::min(end, base + region_.size());
  for (uint64_t a = start & ~uint64_t{desc_.page_size - 1}; a < end; a += desc_.page_size) {
    const size_t page = (a - base) / desc_.page_size;
    if (pages_.get(page) == PageState::kPresent) pages_.set(page, PageState::kMissing);
  }
}

void FaultEngine::refuse_page(Handler& h, size_t page, Errc why, const std::string& text) {
  // Never zero-fill: the waiters are woken into SIGBUS (or SIGSEGV).
  Metrics::bump(h.metrics.transport_errors);
  Metrics::bump(h.metrics.pages_refused);
  pages_.set(page, PageState::kRefused);
  // Recorded before the waiters wake, so that they find the region failed.
  record_failure("page " + std::to_string(page) + " could not be fetched: " + std::string(to_string(why)) +
                 (text.empty() ? "" : " (" + text + ")"));
  std::byte* addr = region_.data() + page * desc_.page_size;
  if (const int rc = uffd_.refuse(addr, desc_.page_size); rc != 0) {
    spdlog::error("region '{}': refusing page {} failed: {}", desc_.name, page, std::strerror(rc));
  }
}

}  // namespace pagewire
