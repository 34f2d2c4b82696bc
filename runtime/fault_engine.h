// The destination side's core: it owns the region's mapping, its
// userfaultfd, the page-state table and the threads that serve faults, and
// wires together the concerns that each have a file of their own:
//
//   handler.cc      the handler loop: read fault events, take each fault,
//                   queue its read and those of a detected stream (prefetch)
//   puller.cc       the background pull, and faults overtaking its runs
//   reads.cc        queueing reads into staging slots, completing them:
//                   install (UFFDIO_COPY / CONTINUE / ZEROPAGE), publish, wake
//   unmap.cc        munmap and mremap of part of the region (uffd events)
//   completion.*    counting present pages; the one owner that decides the
//                   region is complete and unregisters it
//   refusal.*       a page that cannot be fetched is refused, never zeroed
//   residency.*     asking the kernel whether a page is still there
//   threads.*       names, CPU placement and priority of the fault threads
//   cache.*         a bounded cache (far memory): written pages, eviction,
//                   write-back to the memory node, flush
//
// Per fault: a handler reads the event, claims the page in the page table,
// posts a read into one of its staging slots (plus reads ahead of a
// detected stream), and when the read completes installs the page, records
// it present, and wakes every thread parked on it. Pages known to be zero
// are installed without a read. The puller claims missing pages in runs
// through the same table, so each page is fetched once whoever asks first.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <shared_mutex>
#include <span>
#include <string>
#include <vector>

#include "common/unique_fd.h"
#include "pagewire/region.h"
#include "runtime/backing.h"
#include "runtime/cache.h"
#include "runtime/completion.h"
#include "runtime/page_table.h"
#include "runtime/prefetch.h"
#include "runtime/refusal.h"
#include "runtime/region_status.h"
#include "runtime/residency.h"
#include "runtime/uffd.h"
#include "runtime/worker.h"
#include "transport/transport.h"

namespace pagewire {

// Another process's memory, served through the userfaultfd it made and
// registered (pagewire handler, for a VMM): installs go through that
// userfaultfd, and nothing here maps or touches the memory itself.
struct ForeignMemory {
  UniqueFd uffd;
  pid_t pid = 0;
  int pidfd = -1;                   // the process's, open for as long as the engine lives
  std::vector<Segment> segments{};  // in the region's pages
  uint32_t page_size = kSmallPage;
  // Shared memory: the memfd the ranges map, each at the memfd offset of
  // its first source page (registered for minor faults); none: anonymous.
  UniqueFd memfd{};
};

class FaultEngine {
 public:
  // `not_zero`: source pages known written since the zero-page map was
  // made (precopy), never installed as zero pages.
  FaultEngine(std::unique_ptr<Transport> transport, const AttachOptions& options, const ZeroMap* not_zero = nullptr);
  // Serves another process's memory (anonymous, 4 KiB or 2 MiB pages).
  FaultEngine(std::unique_ptr<Transport> transport, const AttachOptions& options, ForeignMemory foreign);
  FaultEngine(const FaultEngine&) = delete;
  FaultEngine& operator=(const FaultEngine&) = delete;
  ~FaultEngine();

  std::byte* data() const { return backing_.view.data(); }
  size_t size() const { return desc_.length; }
  uint32_t page_size() const { return desc_.page_size; }
  const std::string& name() const { return desc_.name; }
  std::string_view transport_name() const { return transport_->name(); }
  Stats stats() const;
  Progress progress() const;
  bool wait_complete(std::chrono::milliseconds timeout) const { return status_.wait_complete(timeout); }
  bool failed() const { return status_.failed(); }
  std::string error() const { return status_.error(); }

  // Precopy (precopy.cc). The pages a live source wrote (bits in the
  // source's pages) are taken back: discarded here, known zero no more,
  // and missing, so that the pull fetches them again. Only while the
  // application cannot touch the region (before attach returns). Returns
  // how many pages (this side's) were taken back.
  size_t take_back_written(const ZeroMap& source_pages);
  // Whether a page here holds a page the source wrote; how many do.
  bool written_here(const ZeroMap& source_pages, size_t page) const;
  size_t count_written_here(const ZeroMap& source_pages) const;
  // The region is not declared complete while held (set before any page
  // arrives when precopy is on).
  void hold_completion(bool held) { completion_->hold(held); }
  const MigrationReport& migration() const { return migration_; }
  MigrationReport& migration() { return migration_; }
  // A bounded cache's flush (see Region::flush()).
  FlushReport flush();

 private:
  // What a handler does about a fault it read.
  //  kFetch: the handler now owns the page and must fetch it.
  //  kOvertake: the page is out in a pull run, which the fault must not
  //    wait behind; the handler reads it again on its own channel.
  //  kNothing: a duplicate, dealt with (left to the page's owner, woken,
  //    or refused).
  enum class Take : uint8_t { kFetch, kOvertake, kNothing };

  // Setup (fault_engine.cc).
  FaultEngine(std::unique_ptr<Transport> transport, const AttachOptions& options, const ZeroMap* not_zero,
              ForeignMemory* foreign);
  // The region's own memory: mapped, named and registered here.
  void set_up_own_memory(const ZeroMap* not_zero, unsigned handlers);
  // Another process's: pages in none of its ranges are not the region's.
  void set_up_foreign_memory();
  std::unique_ptr<Worker> make_worker(unsigned index, uint32_t slots, uint32_t slot_pages, ChannelUse use);
  void start_workers(unsigned handlers);

  // The handler loop (handler.cc).
  void run_handler(Worker& w);
  void read_faults(Worker& w);
  // Polling (AttachOptions::poll_us): true when something arrived before
  // the time ran out (in w.result, or the userfaultfd readable).
  bool poll(Worker& w);
  // One event: a fault is taken and its read queued; munmap and mremap
  // are applied to the page table. `reserved`: faults read but not yet
  // handled, each of which needs a slot.
  void handle_event(Worker& w, const uffd_msg& msg, uint64_t read_ns, uint32_t reserved);
  void handle_fault(Worker& w, const uffd_msg& msg, uint64_t read_ns, uint32_t reserved);
  Take take_fault(Worker& w, size_t page);
  Take take_present(Worker& w, size_t page);
  // For a page taken back from present: kFetch, or kNothing (and the
  // fault woken) when the region became plain memory meanwhile.
  Take take_back(Worker& w, size_t page);
  // Claims and queues the pages a prefetch plan names.
  void prefetch(Worker& w, uint32_t thread_id, size_t page, uint32_t reserved);
  uint32_t claim_run(size_t first, uint32_t max);

  // The background pull (puller.cc).
  void run_puller(Worker& w);
  // While a demand fault is out (or unread), the puller runs at nice 19.
  bool demand_waiting() const;
  void give_way(Worker& w);
  // Claims and queues the next pull run from `cursor`; returns the new cursor.
  size_t queue_pull_run(Worker& w, size_t cursor);
  // Installs what an overtaking read brought, unless the pull got there
  // first, and wakes the faulting threads.
  void finish_overtake(Worker& w, std::byte* src, size_t page);

  // Reads and installs (reads.cc).
  // Queues a read of `pages` claimed pages starting at `first`.
  // `owned` marks the pages of the run this read installs (0: all of them).
  // `first_part` (a byte offset into a one-page read) is read first and the
  // rest after: the faulting 4 KiB of a 2 MiB page goes out first.
  void queue_read(Worker& w, size_t first, uint32_t pages, ReadKind kind, uint64_t start_ns, uint64_t owned = 0,
                  uint32_t first_part = 0, bool write = false);
  // Hands the queued batch to the channel and stamps each read's post time.
  void post_batch(Worker& w);
  // Where a read of pages from `first` lands: the slot's staging buffer, or
  // with shared memory the final pages themselves (through the alias).
  std::byte* landing(Worker& w, uint32_t slot, size_t first) const;
  void complete(Worker& w, const ReadCompletion& c);
  void complete_failed(Worker& w, const Worker::Slot& s);
  void install_run(Worker& w, const Worker::Slot& s, std::byte* src);
  // A run whose install found part of its range unmapped: page by page.
  void install_around_a_hole(Worker& w, size_t first, uint32_t count, std::byte* src);
  // Installs [page, page+count) from where their read landed; 0 or errno.
  // `protect`: write-protected (a bounded cache, for a page not written).
  int install(Worker& w, std::byte* src, size_t page, uint32_t count, bool protect);
  // UFFDIO_COPY of [first, first+count), contiguous at dst (for another
  // process's memory, copy_in_foreign).
  int copy_in(const std::byte* src, std::byte* dst, size_t first, size_t count, bool protect, uint64_t* retries,
              uint64_t* existed);
  // Another process's memory: the same, each attempt under remove_mu_ (see
  // there), deciding page by page between the source's bytes and zeros.
  int copy_in_foreign(const std::byte* src, std::byte* dst, size_t first, size_t count, uint64_t* retries,
                      uint64_t* existed);
  // Another process's shared memory (a memfd it handed over): maps
  // [first, first+count), whose bytes are in the memfd already, with
  // UFFDIO_CONTINUE, range by range, each attempt under remove_mu_. Pages
  // that must read as zeros (`zeros`: none, the removed ones, all) are
  // zeroed in the memfd first (a read that landed after the removal must
  // not be seen), or get a zero page where the memfd has a hole.
  enum class Zeros { kNone, kRemoved, kAll };
  int continue_in_foreign(size_t first, size_t count, Zeros zeros, uint64_t* retries, uint64_t* existed);
  // Reads events of one userfaultfd part; for another process's memory,
  // under remove_mu_ held exclusively, marking the pages of each
  // UFFD_EVENT_REMOVE removed before it lets go.
  int read_events(unsigned part, std::span<uffd_msg> msgs);
  // Installs a claimed zero page without a transfer (`write`: for a write
  // fault, which a bounded cache installs writable and marks written).
  void install_zero(Worker& w, size_t page, bool write);
  // Records installed pages present, counts them, and only then wakes the
  // threads parked on them (installs never wake by themselves).
  // `written`: installed for a write fault (a bounded cache marks them).
  void publish(Worker& w, size_t first, uint32_t count, bool written = false);
  void refuse_page(Worker& w, size_t page, Errc why, const std::string& text);
  void stop_worker_on_exception(Worker& w, const std::exception& e);
  // True when a page the table calls present was discarded by the
  // application; it is then claimed again (IN_FLIGHT) for the caller.
  bool discarded(Worker& w, size_t page);

  // munmap and mremap of part of the region (unmap.cc).
  void on_unmapped(PageCounts& counts, uint64_t start, uint64_t end);
  void unmap_pages(PageCounts& counts, size_t first, size_t last);
  // UFFD_EVENT_REMOVE (MADV_DONTNEED, MADV_REMOVE; a balloon inflating):
  // the range reads as zeros from now on. Its pages are gone until their
  // next fault, which installs a zero page (nothing pulls them back in),
  // and a read still out for one of them installs zeros.
  void on_removed(PageCounts& counts, uint64_t start, uint64_t end);
  void mark_removed(uint64_t start, uint64_t end);
  // A fault on a removed page: claimed (true) for a zero page.
  bool take_removed(Worker& w, size_t page);
  void on_fault_outside(Worker& w, uint64_t address);
  // A fault on a page the table calls gone.
  void on_gone_fault(size_t page);
  // Reads what the kernel has queued (an install answered EAGAIN): address
  // space events are applied now, faults kept for read_faults().
  void read_pending_events(Worker& w);
  // Names the anonymous view after this region, where the kernel can.
  void name_view();
  // At destruction, once the handlers are joined: the munmap events left.
  void read_unmap_events_left();
  // Unmaps what is still the region's when it is destroyed.
  void unmap_view();

  // Relaxed: a precopy round clears bits of pages the source wrote.
  bool zero(size_t page) const { return is_zero_page_relaxed(desc_.zero_map, page); }
  bool removed(size_t page) const { return is_zero_page_relaxed(removed_, page); }
  std::byte* page_addr(size_t page) const { return backing_.addr(page); }

  // Members in creation order; destroyed in reverse: workers (joined in
  // the destructor body) before the uffd, the uffd before the mapping.
  AttachOptions options_;
  std::unique_ptr<Transport> transport_;
  Backing backing_;
  RegionDescriptor desc_;  // the source's, in this side's pages (4 KiB or 2 MiB)
  // Anonymous 2 MiB pages (hugetlb has no UFFDIO_ZEROPAGE), and a bounded
  // cache's (UFFDIO_ZEROPAGE cannot write-protect): zeros to copy from.
  Mapping zero_source_;
  Userfaultfd uffd_;
  PageTable pages_;
  // Anonymous memory with a pull: per page, whether a pull run has it out
  // and no fault has overtaken it yet (the first fault on it clears this).
  std::unique_ptr<std::atomic<bool>[]> pulling_;
  PrefetchTable streams_;
  UniqueFd stop_fd_;
  std::chrono::steady_clock::time_point started_;
  RegionStatus status_;
  Residency residency_;
  Refusal refusal_;
  std::unique_ptr<Completion> completion_;
  std::string view_name_;  // the anonymous view's name in /proc/self/maps; empty: unnamed
  std::vector<std::unique_ptr<Worker>> handlers_;
  std::unique_ptr<Worker> puller_;
  std::unique_ptr<Cache> cache_;  // AttachOptions::cache_bytes; stopped before the handlers are joined
  // Pages removed by another process (UFFD_EVENT_REMOVE): zeros for good.
  ZeroMap removed_{};
  // The kernel zaps a removed range once its event is read, which may be
  // after an install that looked at the page before: that install would
  // land the source's bytes after the zap. So an install into another
  // process's memory looks and installs holding this shared, and events
  // are read, and removals marked, holding it exclusively: an install
  // either lands before the zap (which then takes it) or sees the mark.
  std::shared_mutex remove_mu_;
  MigrationReport migration_;  // filled by precopy before the region is handed out
  // Precopy takes pages back with the pull held: a thread running on
  // another CPU makes every MADV_DONTNEED wait for a TLB shootdown there.
  std::atomic<bool> pull_held_{false};
};

}  // namespace pagewire
