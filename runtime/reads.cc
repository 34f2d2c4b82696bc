// Reads and installs: queueing a read into a staging slot, and completing
// it: install the pages (UFFDIO_COPY from staging, UFFDIO_CONTINUE where the
// read landed in shared memory, UFFDIO_ZEROPAGE for known zero pages),
// record them present, wake their threads; or refuse them.
#include <bit>
#include <cstring>

#include "runtime/fault_engine.h"
#include "spdlog/spdlog.h"

namespace pagewire {

std::byte* FaultEngine::landing(Worker& w, uint32_t slot, size_t first) const {
  return backing_.shared ? backing_.alias.data() + first * desc_.page_size : w.staging->at(slot);
}

void FaultEngine::queue_read(Worker& w, size_t first, uint32_t pages, ReadKind kind, uint64_t start_ns, uint64_t owned,
                             uint32_t first_part, bool write) {
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
  } else if (mask != all_pages(pages)) {
    // Only the stretches this run owns: shared memory reads land in the
    // final pages, never to go over a page that arrived another way; and
    // a run with gaps (a precopy round's written pages, pages demand took)
    // moves only what it installs.
    for_each_stretch(mask, pages, [&](uint32_t i, uint32_t n) {
      const uint64_t at = uint64_t{i} * desc_.page_size;
      read(at, std::min<uint64_t>(uint64_t{n} * desc_.page_size, len - at));
    });
  } else {
    read(0, len);
  }
  w.slots[slot] = {first, pages, mask, kind, start_ns, 0, true, parts, Errc::kOk, write};
  ++w.in_flight;
}

void FaultEngine::post_batch(Worker& w) {
  w.channel->post(w.batch);
  const uint64_t t = now_ns();
  for (const ReadOp& op : w.batch) w.slots[op.cookie].post_ns = t;
}

void FaultEngine::complete(Worker& w, const ReadCompletion& c) {
  const auto slot = static_cast<uint32_t>(c.cookie);
  Worker::Slot& live = w.slots[slot];
  if (c.status != Errc::kOk && live.status == Errc::kOk) live.status = c.status;
  if (--live.parts > 0) return;  // the other part of a split read is still coming
  const Worker::Slot s = live;
  live.busy = false;
  --w.in_flight;
  if (s.kind == ReadKind::kDemand || s.kind == ReadKind::kOvertake) {
    // Before the install: the puller may take the CPU back as soon as
    // the page is on its way in.
    w.demand_out.store(w.demand_out.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
  }
  if (pulling_ && s.kind == ReadKind::kPull) {
    for (uint32_t i = 0; i < s.pages; ++i) {
      if (((s.owned >> i) & 1) != 0) pulling_[s.first + i].store(false, std::memory_order_relaxed);
    }
  }
  if (s.status != Errc::kOk) {
    w.staging->release(slot);
    complete_failed(w, s);
    return;
  }
  if (s.kind == ReadKind::kOvertake) {
    // It owns no page: the pull run still installs the page (and wakes
    // its threads) if this read does not get there first.
    finish_overtake(w, w.staging->at(slot), s.first);
  } else {
    install_run(w, s, landing(w, slot, s.first));
  }
  w.staging->release(slot);
  if (s.kind == ReadKind::kDemand || s.kind == ReadKind::kOvertake) {
    // Where the fault's time went: read to post, the transport, install
    // and wake. The three add up to the whole.
    const uint64_t done = now_ns();
    w.metrics.fault_latency.record(done - s.start_ns);
    w.metrics.stage_event_to_post.record(s.post_ns - s.start_ns);
    w.metrics.stage_transport.record(w.reaped_ns - s.post_ns);
    w.metrics.stage_install_wake.record(done - w.reaped_ns);
  }
}

void FaultEngine::complete_failed(Worker& w, const Worker::Slot& s) {
  // A failed overtaking read owns no page: the pull run installs or
  // refuses it, and wakes its threads.
  if (s.kind == ReadKind::kOvertake) return;
  for (uint32_t i = 0; i < s.pages; ++i) {
    if (((s.owned >> i) & 1) == 0) continue;
    // A fault that overtook the run may have installed the page: it is
    // the source's, the application may be using it, and it stays.
    if (s.kind == ReadKind::kPull && pulling_ && residency_.resident(s.first + i)) {
      publish(w, s.first + i, 1);
    } else {
      refuse_page(w, s.first + i, s.status, w.result.channel_error_text);
    }
  }
}

void FaultEngine::install_run(Worker& w, const Worker::Slot& s, std::byte* src) {
  const uint64_t offset = uint64_t{s.first} * desc_.page_size;
  const uint64_t run_bytes = uint64_t{s.pages} * desc_.page_size;
  const uint64_t len = std::min<uint64_t>(run_bytes, desc_.length - offset);
  if (len < run_bytes) std::memset(src + len, 0, run_bytes - len);
  const auto installed = static_cast<uint32_t>(std::popcount(s.owned));
  // Counted before the copy: the copy wakes the faulting threads, and what
  // they read in stats() afterwards must include their page.
  Metrics::bump(s.kind == ReadKind::kPull ? w.metrics.pages_pulled : w.metrics.pages_fetched, installed);
  // What crossed the wire: the stretches the run owns (its last page is
  // always one of them).
  const uint64_t skipped = uint64_t{s.pages - installed} * desc_.page_size;
  Metrics::bump(w.metrics.bytes_fetched, len - skipped);
  if (s.kind == ReadKind::kPull) Metrics::bump(w.metrics.pull_runs);
  // One install per stretch of owned pages (the whole run, normally). A
  // stretch that fails is refused and the others still go in: a page left
  // in flight would park its threads for good.
  // A bounded cache protects what comes in, but for a write fault's page:
  // the first write to a protected page tells it the page is written.
  const bool protect = cache_ && !s.write;
  for_each_stretch(s.owned, s.pages, [&](uint32_t i, uint32_t n) {
    const int rc = install(w, src + uint64_t{i} * desc_.page_size, s.first + i, n, protect);
    if (rc == 0) {
      publish(w, s.first + i, n, !protect && cache_);
      return;
    }
    if (rc == ENOENT) {
      install_around_a_hole(w, s.first + i, n, src + uint64_t{i} * desc_.page_size);
      return;
    }
    if (rc == ESRCH && backing_.foreign()) {
      // The process whose memory it is has exited: nothing to install.
      for (uint32_t k = i; k < i + n; ++k) refusal_.mark_gone(s.first + k, *w.counts);
      return;
    }
    Metrics::bump(w.metrics.install_failures, n);
    const std::string why =
        backing_.shared && rc == EFAULT
            ? std::string("UFFDIO_CONTINUE: the page is no longer in the memfd (a hole was punched into it while "
                          "attached; over RDMA the memory region still pins the old page, so it cannot be fetched "
                          "again)")
            : std::string(backing_.shared ? "UFFDIO_CONTINUE: " : "UFFDIO_COPY: ") + std::strerror(rc);
    for (uint32_t k = i; k < i + n; ++k) refuse_page(w, s.first + k, Errc::kIo, why);
  });
}

void FaultEngine::install_around_a_hole(Worker& w, size_t first, uint32_t count, std::byte* src) {
  // Part of the range was unmapped meanwhile (the kernel refuses a whole
  // multi-page install that crosses a hole): page by page, the pages still
  // mapped go in, and the rest are gone; the threads that faulted on those
  // fault again on whatever is there now.
  for (uint32_t k = 0; k < count; ++k) {
    const int rc = install(w, src + uint64_t{k} * desc_.page_size, first + k, 1, static_cast<bool>(cache_));
    if (rc == 0) {
      publish(w, first + k, 1);
    } else if (rc == ENOENT) {
      refusal_.mark_gone(first + k, *w.counts);
    } else {
      Metrics::bump(w.metrics.install_failures);
      refuse_page(w, first + k, Errc::kIo, std::string("installing: ") + std::strerror(rc));
    }
  }
}

int FaultEngine::install(Worker& w, std::byte* src, size_t page, uint32_t count, bool protect) {
  const uint64_t bytes = uint64_t{count} * desc_.page_size;
  uint64_t retries = 0;
  uint64_t existed = 0;
  int rc = 0;
  // Counted before the waiters are woken (publish() wakes them), as
  // stats() readers expect.
  if (backing_.shared) {
    // The read landed in these very pages (through the alias): map them.
    rc = backing_.foreign() ? continue_in_foreign(page, count, Zeros::kRemoved, &retries, &existed)
                            : uffd_.map_in_place(page_addr(page), bytes, desc_.page_size, &retries, &existed);
    if (rc == 0) Metrics::bump(w.metrics.pages_continued, count);
  } else {
    // One copy per part contiguous in memory (another process's ranges).
    backing_.for_each_range(page, count, [&](std::byte* dst, size_t first, size_t n) {
      if (rc == 0) rc = copy_in(src + (first - page) * desc_.page_size, dst, first, n, protect, &retries, &existed);
    });
    if (rc == 0) Metrics::bump(w.metrics.bytes_copied, bytes);
  }
  if (retries > 0) Metrics::bump(w.metrics.copy_retries, retries);
  if (existed > 0) Metrics::bump(w.metrics.copy_eexist, existed);
  return rc;
}

int FaultEngine::copy_in(const std::byte* src, std::byte* dst, size_t first, size_t count, bool protect,
                         uint64_t* retries, uint64_t* existed) {
  if (backing_.foreign()) return copy_in_foreign(src, dst, first, count, retries, existed);
  return uffd_.copy(dst, src, count * desc_.page_size, desc_.page_size, retries, existed, protect);
}

int FaultEngine::copy_in_foreign(const std::byte* src, std::byte* dst, size_t first, size_t count, uint64_t* retries,
                                 uint64_t* existed) {
  const size_t ps = desc_.page_size;
  for (size_t k = 0; k < count;) {
    int rc = 0;
    {
      std::shared_lock lock(remove_mu_);
      // A stretch of pages all removed (zeros) or all not (the source's).
      const bool zeros = removed(first + k);
      size_t n = 1;
      while (k + n < count && removed(first + k + n) == zeros) ++n;
      size_t done = 0;
      if (!zeros) {
        rc = uffd_.copy_once(dst + k * ps, src + k * ps, n * ps, &done);
      } else if (backing_.huge) {
        rc = uffd_.copy_once(dst + k * ps, zero_source_.data(), ps, &done);
        n = 1;
      } else {
        rc = uffd_.zeropage_once(dst + k * ps, n * ps, &done);
      }
      if (rc == 0) {
        k += n;
        continue;
      }
      k += done / ps;
      if (rc == EEXIST) {
        ++*existed;
        ++k;
        continue;
      }
    }
    if (rc != EAGAIN) return rc;
    // An address-space event is pending: read it (without the lock, which
    // reading takes), then look at the pages again.
    ++*retries;
    read_thread_pending_events();
  }
  return 0;
}

int FaultEngine::continue_in_foreign(size_t first, size_t count, Zeros zeros, uint64_t* retries, uint64_t* existed) {
  const size_t ps = desc_.page_size;
  int rc = 0;
  unsigned punched = 0;
  backing_.for_each_range(first, count, [&](std::byte* dst, size_t from, size_t n) {
    for (size_t k = 0; k < n && rc == 0;) {
      int once = 0;
      {
        std::shared_lock lock(remove_mu_);
        const auto zero_here = [&](size_t p) {
          return zeros == Zeros::kAll || (zeros == Zeros::kRemoved && removed(p));
        };
        const bool zero = zero_here(from + k);
        size_t done = 0;
        size_t m = 1;
        if (!zero) {
          // A stretch of pages whose bytes are the memfd's: mapped as they are.
          while (k + m < n && !zero_here(from + k + m)) ++m;
          once = uffd_.continue_once(dst + k * ps, m * ps, &done);
        } else if (residency_.memfd_holds(from + k)) {
          // Zeroed where it is (a read may have landed there), and mapped.
          std::memset(backing_.alias.data() + (from + k) * ps, 0, ps);
          once = uffd_.continue_once(dst + k * ps, ps, &done);
        } else {
          // A hole (punched out): a zero page through the missing
          // registration, allocated for the process, never through the
          // alias here (a hugetlb pool with no page left would be SIGBUS in
          // the daemon).
          once = backing_.huge ? uffd_.copy_once(dst + k * ps, zero_source_.data(), ps, &done)
                               : uffd_.zeropage_once(dst + k * ps, ps, &done);
          // The memfd holds the page after all: one installed here
          // earlier, which this side never mapped (mincore of a hugetlb
          // alias cannot see it), with what the process wrote to it since.
          // Mapped as it is.
          if (once == EEXIST) once = uffd_.continue_once(dst + k * ps, ps, &done);
        }
        if (once == 0) {
          k += m;
          continue;
        }
        k += done / ps;
        if (once == EEXIST) {
          ++*existed;
          ++k;
          continue;
        }
        if (once == EFAULT && zero && ++punched < 64) {
          // MADV_REMOVE punches its hole once its event is read, which may
          // be after the page was zeroed here: it is a hole now; look again.
          // (Bounded: a page that never stays is refused.)
          ++*retries;
          continue;
        }
      }
      if (once != EAGAIN) {
        rc = once;
        break;
      }
      ++*retries;
      read_thread_pending_events();  // without the lock, which reading takes
    }
  });
  return rc;
}

void FaultEngine::install_zero(Worker& w, size_t page, bool write) {
  uint64_t retries = 0;
  uint64_t existed = 0;
  std::byte* dst = page_addr(page);
  int rc = 0;
  const char* how = "UFFDIO_ZEROPAGE: ";
  if (backing_.shared && backing_.foreign()) {
    rc = continue_in_foreign(page, 1, Zeros::kAll, &retries, &existed);
    how = "installing a zero page: ";
  } else if (backing_.shared) {
    // A memfd handed in may hold old bytes there: zero the page itself.
    std::memset(backing_.alias.data() + page * desc_.page_size, 0, desc_.page_size);
    rc = uffd_.map_in_place(dst, desc_.page_size, desc_.page_size, &retries, &existed);
    how = "UFFDIO_CONTINUE: ";
  } else if (backing_.huge || cache_) {
    rc = uffd_.copy(dst, zero_source_.data(), desc_.page_size, desc_.page_size, &retries, &existed, cache_ && !write);
    how = "UFFDIO_COPY: ";
  } else {
    rc = uffd_.zeropage(dst, desc_.page_size, desc_.page_size, &retries, &existed);
  }
  if (retries > 0) Metrics::bump(w.metrics.copy_retries, retries);
  if (rc == ENOENT || (rc == ESRCH && backing_.foreign())) {
    refusal_.mark_gone(page, *w.counts);
  } else if (rc != 0) {
    Metrics::bump(w.metrics.install_failures);
    refuse_page(w, page, Errc::kIo, how + std::string(std::strerror(rc)));
  } else {
    Metrics::bump(w.metrics.pages_zero);
    publish(w, page, 1, cache_ && write);
  }
}

void FaultEngine::publish(Worker& w, size_t first, uint32_t count, bool written) {
  // Present in the table before anyone waiting on these pages runs: a woken
  // thread that discards its page and faults again must find it present.
  // A page unmapped meanwhile stays gone (and was counted so).
  // A bounded cache marks them first: a page written the moment it is
  // present is never taken for a clean one.
  if (cache_) cache_->installed(first, count, written);
  int64_t settled = 0;
  for (uint32_t k = 0; k < count; ++k) settled += pages_.settle(first + k, PageState::kPresent) ? 1 : 0;
  PageCounts::add(w.counts->present, settled);
  if (cache_) cache_->note_resident();
  backing_.for_each_range(first, count,
                          [&](std::byte* addr, size_t, size_t n) { uffd_.wake(addr, uint64_t{n} * desc_.page_size); });
}

void FaultEngine::refuse_page(Worker& w, size_t page, Errc why, const std::string& text) {
  // Never zero-fill: the waiters are woken into SIGBUS (or SIGSEGV).
  Metrics::bump(w.metrics.transport_errors);
  // Counted before the waiters wake (stats() readers expect it), and taken
  // back when an munmap took the page meanwhile (nothing was refused).
  Metrics::bump(w.metrics.pages_refused);
  if (!refusal_.refuse(page, std::string(to_string(why)) + (text.empty() ? "" : " (" + text + ")"), *w.counts)) {
    w.metrics.pages_refused.store(w.metrics.pages_refused.load(std::memory_order_relaxed) - 1,
                                  std::memory_order_relaxed);
  }
}

void FaultEngine::stop_worker_on_exception(Worker& w, const std::exception& e) {
  // Nothing may escape a thread; the region is marked failed instead, and
  // the pages this worker owned are refused: nobody else would ever
  // install them, and their waiters would stay parked.
  const std::string why = std::string("a fault worker stopped: ") + e.what();
  status_.record_failure(why);
  w.demand_out.store(0, std::memory_order_relaxed);  // the puller need not give way to it
  for (auto& slot : w.slots) {
    if (!slot.busy) continue;
    slot.busy = false;
    if (slot.kind == ReadKind::kOvertake) continue;  // its page is a pull run's
    for (uint32_t i = 0; i < slot.pages; ++i) {
      if (((slot.owned >> i) & 1) != 0) refuse_page(w, slot.first + i, Errc::kIo, why);
    }
  }
}

}  // namespace pagewire
