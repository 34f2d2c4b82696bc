// Counters and latency percentiles of one attached region.
#pragma once

#include <cstdint>
#include <string>

namespace pagewire {

struct LatencySummary {
  uint64_t count = 0;
  uint64_t p50_ns = 0;
  uint64_t p90_ns = 0;
  uint64_t p99_ns = 0;
  uint64_t p999_ns = 0;
  uint64_t max_ns = 0;
  double mean_ns = 0;
};

// Where a demand fault's time goes inside its handler, stage by stage. The
// three add up to the handler's whole fault (Stats::fault_latency).
struct FaultStages {
  LatencySummary event_to_post;  // fault event read -> its read posted to the transport
  LatencySummary transport;      // read posted -> its completion reaped (the wire and the peer)
  LatencySummary install_wake;   // completion -> page installed and the faulting threads woken
};

struct Stats {
  uint64_t faults = 0;            // fault events read from userfaultfd
  uint64_t pages_fetched = 0;     // pages read on demand (faults and prefetch) and installed
  uint64_t bytes_fetched = 0;     // payload bytes read from the source
  uint64_t duplicate_faults = 0;  // faults on a page already in flight or present
  uint64_t copy_retries = 0;      // UFFDIO_COPY answered EAGAIN and was retried
  uint64_t copy_eexist = 0;       // UFFDIO_COPY found the page already there
  uint64_t transport_errors = 0;  // reads that completed with an error
  uint64_t reconnects = 0;        // connections re-established after a drop
  uint64_t pages_refused = 0;     // pages made inaccessible because they could not be fetched
  uint64_t install_failures = 0;  // pages fetched whose UFFDIO_COPY failed (then refused)
  uint64_t pages_zero = 0;        // known zero, never transferred (UFFDIO_ZEROPAGE, or zeroed in place)
  // How pages went in: copied out of a staging buffer (UFFDIO_COPY), or
  // mapped where the read landed (shared memory: UFFDIO_CONTINUE, no copy).
  uint64_t bytes_copied = 0;
  uint64_t pages_continued = 0;
  uint64_t pages_pulled = 0;  // fetched by the background pull
  uint64_t pull_runs = 0;     // its reads (one multi-page read and one UFFDIO_COPY each)
  // Faults on a page out in a pull run that read it again on their own
  // connection, ahead of the run, and installed it first (anonymous memory).
  uint64_t faults_overtaken = 0;
  uint64_t prefetch_issued = 0;  // pages fetched ahead of a detected sequential or strided stream
  uint64_t prefetch_used = 0;    // of those, pages the stream then walked over
  uint64_t prefetch_wasted = 0;  // of those, pages past the point where the stream broke off
  bool complete = false;         // every page present; the region is plain memory now
  uint64_t pages_present = 0;    // pages installed so far
  uint64_t pages_total = 0;
  // Pages of the region the application unmapped (or moved away with
  // mremap): no longer the region's, and not waited for to complete it.
  uint64_t pages_unmapped = 0;
  // A bounded cache (AttachOptions::cache_bytes): pages evicted (dropped
  // here), of those written back first, the bytes that took, write faults
  // (a first write to a page that came in clean), and the most pages that
  // were resident at once.
  uint64_t pages_evicted = 0;
  uint64_t pages_written_back = 0;
  uint64_t bytes_written_back = 0;
  uint64_t write_faults = 0;
  uint64_t writeback_failures = 0;  // write-backs the node did not acknowledge
  uint64_t max_resident_pages = 0;
  // Time from reading the fault event to the page being installed, measured
  // by the handler thread (the faulting thread also waits for the wake-up).
  // Counters are exact once a faulting thread resumes; the latency sample of
  // its fault is recorded just after, so it may lag by a few.
  LatencySummary fault_latency;
  // The same faults split by stage; JSON key "stages", an object of stage
  // name -> summary with the same fields as fault_latency.
  FaultStages stages;
};

// Human-readable and JSON renderings used by the command line.
std::string format_stats(const Stats& stats);
std::string stats_to_json(const Stats& stats);

}  // namespace pagewire
