#include "runtime/precopy.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "runtime/fault_engine.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Until the pull has every page again (or the region failed), telling
// on_progress how far it is every 200 ms.
void wait_all_present(const FaultEngine& e, const PrecopyOptions& o) {
  Clock::time_point told = Clock::now();
  for (;;) {
    const Progress p = e.progress();
    if (p.failed) throw Error(Errc::kIo, "precopy: " + e.error());
    if (p.pages_present >= p.pages_total) return;
    if (o.on_progress && Clock::now() - told >= std::chrono::milliseconds(200)) {
      o.on_progress(p);
      told = Clock::now();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace

bool FaultEngine::written_here(const ZeroMap& source_pages, size_t page) const {
  const uint64_t per = std::max<uint64_t>(1, desc_.page_size / transport_->region().page_size);
  for (uint64_t s = page * per; s < (page + 1) * per; ++s) {
    if (s / 64 < source_pages.size() && ((source_pages[s / 64] >> (s % 64)) & 1) != 0) return true;
  }
  return false;
}

size_t FaultEngine::count_written_here(const ZeroMap& source_pages) const {
  size_t n = 0;
  for (size_t p = 0; p < pages_.size(); ++p) n += written_here(source_pages, p) ? 1 : 0;
  return n;
}

size_t FaultEngine::take_back_written(const ZeroMap& source_pages) {
  PageCounts& mine = completion_->slot(static_cast<unsigned>(handlers_.size()) + 1);
  const auto written = [&](size_t page) { return written_here(source_pages, page); };
  // Each stretch of present written pages is owned (in flight), discarded
  // in one call, and only then made missing for the pull to take. Shared
  // memory drops only the region's mapping of the page: the memfd keeps it
  // (an RDMA memory region pins it, and a hole punched under it would
  // leave reads landing in a page the memfd no longer has), and the next
  // read overwrites it in place before UFFDIO_CONTINUE maps it again.
  size_t taken = 0;
  const auto discard = [&](size_t first, size_t end) {
    if (first == end) return;
    const size_t bytes = (end - first) * desc_.page_size;
    if (::madvise(page_addr(first), bytes, MADV_DONTNEED) != 0) throw_errno("precopy: discarding written pages");
    for (size_t p = first; p < end; ++p) pages_.settle(p, PageState::kMissing);
    taken += end - first;
  };
  // Measured here: 3 us a page with nothing else running, 40 with the
  // pull installing pages on the other CPU.
  pull_held_.store(true);
  struct Release {
    std::atomic<bool>& held;
    ~Release() { held.store(false); }
  } release{pull_held_};
  size_t first = 0;
  size_t end = 0;
  for (size_t p = 0; p < pages_.size(); ++p) {
    if (!written(p)) continue;
    clear_zero_page(desc_.zero_map, p);  // data now, whatever it was at attach
    if (!pages_.transition(p, PageState::kPresent, PageState::kInFlight)) {
      // Missing: fetched later, from the source as it is then. Nothing
      // else is possible before the application starts.
      continue;
    }
    PageCounts::add(mine.present, -1);
    if (p != end) {
      discard(first, end);
      first = p;
    }
    end = p + 1;
  }
  discard(first, end);
  return taken;
}

void run_precopy(FaultEngine& e, SourceControl& control, uint64_t epoch, const PrecopyOptions& o) {
  MigrationReport& report = e.migration();
  const Clock::time_point began = Clock::now();  // the engine started a moment before
  const unsigned max_rounds = std::max(1u, o.max_rounds);
  uint64_t round_pages = e.progress().pages_total;
  double bandwidth = 0;  // the best bytes per second a round moved
  // What the switchover spends per written page: discarding it here (the
  // page moves later, by postcopy). Measured at each round's take-back;
  // until then, the time the page would take on the wire.
  double take_back_seconds_per_page = 0;
  // A round begins when its pages become missing: round 1 when the engine
  // started (its pull began at once), each later one as its take-back
  // begins (the pull fetches each stretch as soon as it is taken back).
  Clock::time_point start = Clock::now() - std::chrono::duration_cast<Clock::duration>(
                                               std::chrono::duration<double>(e.progress().seconds));
  uint64_t bytes_before = 0;
  for (unsigned round = 1;; ++round) {
    wait_all_present(e, o);
    const double seconds = std::max(seconds_since(start), 1e-6);
    const uint64_t bytes = e.stats().bytes_fetched - bytes_before;
    // What the owner wrote while this round ran (and since the round
    // before asked): the next round's work.
    const SourceControl::Written w = control.written_since(epoch);
    const PrecopyRound r{round, round_pages, bytes, seconds, static_cast<double>(w.count) / seconds};
    report.rounds.push_back(r);
    if (o.on_round) o.on_round(r);
    if (bytes > 0) bandwidth = std::max(bandwidth, static_cast<double>(bytes) / seconds);
    // In this side's pages: with 2 MiB pages, one 4 KiB write takes back
    // its whole 2 MiB page.
    const uint64_t to_take = e.count_written_here(w.pages);
    const double wire_seconds_per_page = bandwidth > 0 ? e.page_size() / bandwidth : 1;
    const double needs_ms = static_cast<double>(to_take) * std::max(wire_seconds_per_page, take_back_seconds_per_page) *
                            1e3;
    if (needs_ms <= o.max_downtime_ms) {
      report.switched_because = "converged";
    } else if (round >= max_rounds) {
      report.switched_because = "round limit";
    } else if (to_take >= round_pages) {
      // More was written while the round ran than the round moved: another
      // round would not leave less. Postcopy takes the rest.
      report.switched_because = "writer outpaces the pull";
    }
    if (!report.switched_because.empty()) break;
    start = Clock::now();
    bytes_before = e.stats().bytes_fetched;
    round_pages = e.take_back_written(w.pages);
    if (round_pages > 0) take_back_seconds_per_page = seconds_since(start) / static_cast<double>(round_pages);
    epoch = w.epoch;
  }
  // Switchover: the source stands still, the last written set (since the
  // last round began) goes, and the application may start.
  report.precopy_seconds = seconds_since(began);
  const Clock::time_point pause = Clock::now();
  control.pause();
  const double pause_ms = seconds_since(pause) * 1e3;
  double harvest_ms = 0;
  try {
    const SourceControl::Written last = control.written_since(epoch);
    harvest_ms = seconds_since(pause) * 1e3 - pause_ms;
    report.pages_written_at_switch = e.take_back_written(last.pages);
  } catch (...) {
    // The source must not stay paused for a migration that will not
    // happen: give it back to its owner if it can still be told.
    try {
      control.resume();
    } catch (const std::exception& e2) {
      spdlog::error("precopy: '{}' failed after pausing the source, which could not be resumed: {}", e.name(),
                    e2.what());
    }
    throw;
  }
  e.hold_completion(false);
  report.downtime_ms = seconds_since(pause) * 1e3;
  spdlog::info("precopy: '{}' switched over after {} rounds ({}), {:.1f} s; {} pages left to postcopy; downtime "
               "{:.2f} ms (pause {:.2f}, last harvest {:.2f}, taking back {:.2f})",
               e.name(), report.rounds.size(), report.switched_because, report.precopy_seconds,
               report.pages_written_at_switch, report.downtime_ms, pause_ms, harvest_ms,
               report.downtime_ms - pause_ms - harvest_ms);
}

}  // namespace pagewire
