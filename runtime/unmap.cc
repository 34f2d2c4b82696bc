// munmap and mremap of part of an attached region. With UFFD_EVENT_UNMAP
// and UFFD_EVENT_REMAP the kernel tells the handlers (and the task that
// unmaps waits until one has read the event): the pages of that range are
// no longer the region's. They are marked gone, so that nothing installs,
// counts, protects or unregisters them any more; an install already on its
// way finds the range gone (ENOENT) and only wakes its threads, which then
// fault again as on any unmapped address.
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "runtime/fault_engine.h"
#include "runtime/uffd_compat.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

using Range = std::pair<uintptr_t, uintptr_t>;

// The mappings in [base, end) that are still the region's own, by what
// /proc/self/smaps says of each: shared memory maps the region's memfd (its
// inode); anonymous memory carries the name the region gave it or, where
// the kernel names no anonymous memory (and for hugetlb), the region's
// MADV_DONTFORK ("dc"), which a mapping the application makes there lacks
// unless it sets it too. Once the region is plain memory, no munmap event
// tells of a range the application unmapped and mapped again. False when
// smaps cannot be read.
bool own_mappings(uintptr_t base, uintptr_t end, const Backing& b, const std::string& name, std::vector<Range>* out) {
  std::ifstream in("/proc/self/smaps");
  if (!in) return false;
  struct stat st {};
  if (b.shared && ::fstat(b.memfd.get(), &st) != 0) return false;
  const std::string label = "[anon:" + name + "]";
  std::string line;
  Range current{0, 0};
  uint64_t inode = 0;
  bool named = false;
  while (std::getline(in, line)) {
    uintptr_t from = 0;
    uintptr_t to = 0;
    uint64_t ino = 0;
    int path_at = 0;
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " %*s %*s %*s %" SCNu64 "%n", &from, &to, &ino, &path_at) ==
        3) {
      current = {std::max(from, base), std::min(to, end)};
      inode = ino;
      named = line.find(label, static_cast<size_t>(path_at)) != std::string::npos;
      continue;
    }
    if (line.rfind("VmFlags:", 0) != 0 || current.first >= current.second) continue;
    bool ours = false;
    if (b.shared) {
      ours = inode == static_cast<uint64_t>(st.st_ino);
    } else if (!name.empty()) {
      ours = named;  // the region's own name: no other mapping carries it
    } else {
      ours = (line + " ").find(" dc ") != std::string::npos;
    }
    if (ours) out->push_back(current);
    current = {0, 0};
  }
  return true;
}

}  // namespace

namespace {

// Calls f(first, last) for the region's pages in [start, end) of each of its
// segments (whole pages: the kernel unmaps and removes whole pages).
template <typename F>
void for_each_page_span(const Backing& b, uint64_t start, uint64_t end, F f) {
  for (const Segment& s : b.segments) {
    const uint64_t from = std::max<uint64_t>(start, s.addr);
    const uint64_t to = std::min<uint64_t>(end, s.addr + s.pages * b.page_size());
    if (from >= to) continue;
    f(s.first_page + (from - s.addr) / b.page_size(), s.first_page + (to - s.addr + b.page_size() - 1) / b.page_size());
  }
}

}  // namespace

void FaultEngine::on_unmapped(PageCounts& counts, uint64_t start, uint64_t end) {
  for_each_page_span(backing_, start, end, [&](size_t first, size_t last) { unmap_pages(counts, first, last); });
}

void FaultEngine::mark_removed(uint64_t start, uint64_t end) {
  for_each_page_span(backing_, start, end, [&](size_t first, size_t last) {
    for (size_t p = first; p < last; ++p) set_zero_page(removed_, p);
  });
}

void FaultEngine::on_removed(PageCounts& counts, uint64_t start, uint64_t end) {
  size_t removed = 0;
  // Marked first (and already, when the event was read): a read out for a
  // page installs zeros in place of what it brings, and the source's bytes
  // are never its again.
  mark_removed(start, end);
  for_each_page_span(backing_, start, end, [&](size_t first, size_t last) {
    for (size_t p = first; p < last; ++p) {
      // Gone until its next fault, which installs a zero page: nothing
      // pulls it back in, and the region can still complete.
      for (;;) {
        const PageState s = pages_.get(p);
        if (s != PageState::kPresent && s != PageState::kMissing) break;  // in flight, refused or gone already
        // Shared memory keeps a present page in the memfd through
        // MADV_DONTNEED (with what was written to it), and a fault maps it
        // again as it is there; a page punched out (MADV_REMOVE) is a hole,
        // which that fault fills with zeros.
        if (s == PageState::kPresent && backing_.shared) break;
        if (!pages_.transition(p, s, PageState::kGone)) continue;
        if (s == PageState::kPresent) PageCounts::add(counts.present, -1);
        PageCounts::add(counts.gone, 1);
        ++removed;
        break;
      }
    }
  });
  spdlog::debug("region '{}': {} pages removed ({:#x}..{:#x}); they read as zeros from now on", desc_.name, removed,
                start, end);
}

bool FaultEngine::take_removed(Worker& w, size_t page) {
  if (!removed(page) || !pages_.transition(page, PageState::kGone, PageState::kInFlight)) return false;
  PageCounts::add(w.counts->gone, -1);
  return true;
}

void FaultEngine::unmap_pages(PageCounts& counts, size_t first, size_t last) {
  size_t gone = 0;
  for (size_t p = first; p < last; ++p) {
    for (;;) {
      const PageState s = pages_.get(p);
      if (s == PageState::kGone) break;
      if (!pages_.transition(p, s, PageState::kGone)) continue;
      // An in-flight page's read still completes: its install finds the
      // range gone, and the page stays gone.
      if (s == PageState::kPresent) PageCounts::add(counts.present, -1);
      PageCounts::add(counts.gone, 1);
      ++gone;
      break;
    }
  }
  spdlog::info("region '{}': pages {}..{} unmapped by the application ({} left the region); serving the rest",
               desc_.name, first, last - 1, gone);
}

void FaultEngine::on_gone_fault(size_t page) {
  // Usually a fault read after the munmap that took its page: the range is
  // unmapped, and the woken thread faults on whatever is there now. But a
  // range mremap left registered (MREMAP_DONTUNMAP, or part of the region
  // moved onto another part) faults here for good: with UFFDIO_POISON that
  // is refused (it is no longer the region's, and never zero-filled).
  // Without it the thread is only woken: a PROT_NONE could land on a
  // mapping the application made in the hole since the fault was queued.
  std::byte* addr = page_addr(page);
  if (!uffd_.has(UFFD_FEATURE_POISON) || uffd_.refuse(addr, desc_.page_size) != 0) {
    uffd_.wake(addr, desc_.page_size);
  }
}

void FaultEngine::on_fault_outside(Worker& w, uint64_t address) {
  // Only part of the region moved by mremap can fault here: the page had
  // not arrived when it moved, and its place in the region is no longer
  // known to be its own. Refused (SIGBUS, or SIGSEGV without
  // UFFDIO_POISON), never zero-filled.
  Metrics::bump(w.metrics.pages_refused);
  auto* addr = reinterpret_cast<std::byte*>(address & ~(uint64_t{desc_.page_size} - 1));
  const int rc = uffd_.refuse(addr, desc_.page_size);
  if (rc != 0 && backing_.foreign()) refusal_.kill_foreign("a fault outside the ranges it handed over");
  spdlog::warn("region '{}': a fault at {:#x}, outside the region (moved there by mremap before it arrived): "
               "refused{}",
               desc_.name, address, rc == 0 ? "" : std::string(" (failed: ") + std::strerror(rc) + ")");
}

int FaultEngine::read_events(unsigned part, std::span<uffd_msg> msgs) {
  if (!backing_.foreign()) return uffd_.read_events(part, msgs);
  std::unique_lock lock(remove_mu_);
  const int n = uffd_.read_events(part, msgs);
  for (int i = 0; i < n; ++i) {
    const uffd_msg& m = msgs[static_cast<size_t>(i)];
    // Marked now; the page table follows in on_removed().
    if (m.event == UFFD_EVENT_REMOVE) mark_removed(m.arg.remove.start, m.arg.remove.end);
  }
  return n;
}

void FaultEngine::read_pending_events(Worker& w) {
  // Every part's: the install that waits may be in another handler's part
  // (a pull run, a read ahead), and its event may be there.
  uffd_msg msgs[Worker::kEventBatch];
  for (unsigned part = 0; part < uffd_.parts(); ++part) {
    const int n = read_events(part, std::span(msgs, Worker::kEventBatch));
    for (int i = 0; i < n; ++i) {
      const uffd_msg& m = msgs[i];
      if (m.event == UFFD_EVENT_PAGEFAULT) {
        w.deferred.push_back(m);
      } else {
        handle_event(w, m, now_ns(), 0);
      }
    }
  }
}

void FaultEngine::name_view() {
  // A name of the region's own on its anonymous memory (Linux 5.17+, where
  // the kernel is built with it), so that its end can tell its mappings
  // from any other in its range.
  if (backing_.shared || backing_.huge) return;
  char name[64];
  std::snprintf(name, sizeof name, "pagewire-%" PRIxPTR, reinterpret_cast<uintptr_t>(backing_.view.data()));
  if (::prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, backing_.view.data(), backing_.view.size(), name) == 0) {
    view_name_ = name;
  }
}

void FaultEngine::read_unmap_events_left() {
  // The handlers are gone: apply what munmap events are still queued, so
  // that what follows (protecting, unmapping) knows those ranges are gone.
  PageCounts counts;
  uffd_msg msgs[Worker::kEventBatch];
  for (unsigned part = 0; part < uffd_.parts(); ++part)
    for (int n = 0; (n = read_events(part, std::span(msgs, Worker::kEventBatch))) > 0;) {
      for (int i = 0; i < n; ++i) {
        const uffd_msg& m = msgs[i];
        if (m.event == UFFD_EVENT_UNMAP) on_unmapped(counts, m.arg.remove.start, m.arg.remove.end);
        if (m.event == UFFD_EVENT_REMAP) on_unmapped(counts, m.arg.remap.from, m.arg.remap.from + m.arg.remap.len);
      }
    }
}

void FaultEngine::unmap_view() {
  // Only what is still the region's: a range the application unmapped may
  // hold another mapping of its own by now.
  const auto base = reinterpret_cast<uintptr_t>(backing_.view.data());
  std::vector<Range> own;
  if (!own_mappings(base, base + backing_.view.size(), backing_, view_name_, &own)) {
    own = {{base, base + backing_.view.size()}};
  }
  for (const Range& r : own) {
    // And of those, the pages no munmap event has taken away.
    const size_t first = (r.first - base) / desc_.page_size;
    const size_t last = (r.second - base) / desc_.page_size;
    for (size_t p = first; p < last;) {
      size_t q = p;
      while (q < last && pages_.get(q) != PageState::kGone) ++q;
      if (q > p) ::munmap(page_addr(p), (q - p) * desc_.page_size);
      p = std::max(q, p + 1);
    }
  }
  backing_.view.release();
}

}  // namespace pagewire
