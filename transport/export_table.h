// The source side's exports: which regions a memory server serves, each
// with the identity a reconnecting destination checks and the zero-page
// map it is given. Every server (TCP, RDMA) finds regions here by name; the
// wire code only reads them. What the source learns about its memory later
// (which pages were written) belongs here too.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/unique_fd.h"
#include "pagewire/server.h"
#include "transport/live_export.h"
#include "transport/zero_map.h"

namespace pagewire {

// The one-writer-at-a-time rule of a memory node: a writer's connections
// share a lease id; the lease goes when the last of them closes.
class WriterLease {
 public:
  // Admits a writer connection: `presented` 0 asks for a fresh lease (kLeased
  // while another is held); nonzero is a lease this destination was given,
  // admitted while it is held, or again once it went if no other writer came
  // since (a reconnect after every connection dropped). Returns the lease
  // id, or 0 when refused.
  uint64_t acquire(uint64_t presented);
  // The same answer as acquire(), for a writer that will connect again
  // within `hold` (over RDMA, with a ticket): nothing is held, but a fresh
  // lease granted here stays reserved for it that long, so that no other
  // writer takes the node in between.
  uint64_t reserve(uint64_t presented, std::chrono::milliseconds hold);
  // A connection admitted by acquire() closed.
  void release();
  bool holds(uint64_t lease) const;

 private:
  uint64_t admit_locked(uint64_t presented);

  mutable std::mutex mu_;
  uint64_t lease_ = 0;  // the last lease granted; held while holders_ > 0
  uint32_t holders_ = 0;
  std::chrono::steady_clock::time_point reserved_until_{};
};

struct ExportedRegion {
  std::string name;
  const std::byte* base = nullptr;
  uint64_t length = 0;
  uint32_t page_size = 4096;
  uint32_t key = 0;       // its index in the table; names it on the wire
  uint64_t identity = 0;  // see MemoryServer::export_memory
  Mapping file_mapping;   // set for file-backed regions
  // Memory nodes only (ExportTable::node): the zeroed memory the server owns
  // and destinations write, through writable_base; null for read-only exports.
  Mapping node_memory;
  std::byte* writable_base = nullptr;
  mutable WriterLease lease;  // who may write a node
  // A node's pages ever written, one bit each (set before a write is
  // applied). Its complement is the node's zero-page map, which only the
  // writer is given: a reader's copy would go stale with the next write,
  // while the writer's own writes are the only ones there are.
  std::unique_ptr<std::atomic<uint64_t>[]> written;
  // Pages known to be zero. Updated in place under zero_map_mu when the
  // owner reports a change (the RDMA server has it registered for reads,
  // so it is never reallocated).
  ZeroMap zero_map;
  mutable std::mutex zero_map_mu;

  // Set when the owner keeps writing (ExportOptions::track_writes); last,
  // so that it stops tracking before the rest goes.
  std::unique_ptr<LiveExport> live;

  // A copy of the zero-page map, to send without holding its lock.
  ZeroMap zero_map_snapshot() const;
  // A node: the pages never written, for its writer.
  ZeroMap unwritten_map() const;
  // A node: marks the pages a write to [offset, offset+length) touches.
  void mark_written(uint64_t offset, uint64_t length) const;
};

class ExportTable {
 public:
  ExportTable() = default;
  ExportTable(const ExportTable&) = delete;
  ExportTable& operator=(const ExportTable&) = delete;

  // A region of a file, mapped read-only, whose identity is the file's
  // (device, inode, size, mtime): a server restarted on the same unchanged
  // file serves the same region. Throws for a name no URI could carry, a
  // bad page size, or a file that cannot be mapped.
  static std::unique_ptr<ExportedRegion> from_file(const std::string& name, const std::string& path,
                                                   uint32_t page_size);
  // A region of memory the caller keeps mapped; identity 0 draws a fresh
  // one. Its writes are not tracked yet: see make_live().
  static std::unique_ptr<ExportedRegion> from_memory(const std::string& name, const void* base, size_t length,
                                                     const ExportOptions& options);

  // Fresh zeroed memory that destinations may write (a memory node), owned
  // by the region, with a fresh identity. It advertises no zero-page map: a
  // reader's copy would go stale as soon as a writer wrote.
  static std::unique_ptr<ExportedRegion> node(const std::string& name, size_t length, uint32_t page_size);

  // Gives the region its key and, unless `findable` is false (publish()
  // later), makes it findable; throws when the name is taken. Its memory
  // stays until the table goes.
  const ExportedRegion& add(std::unique_ptr<ExportedRegion> region, bool findable = true);
  // Tracks the writes to a region added but not yet findable (after its
  // RDMA registration: the device pins its pages for writing, which a
  // write-protected range refuses) and computes its zero-page map again,
  // so that a write before tracking began is not taken for a zero page.
  void make_live(const ExportedRegion& region, const ExportOptions& options);
  void publish(const ExportedRegion& region);
  // Takes a region just added out of reach again: no new destination finds
  // it (the memory stays until the table goes).
  void withdraw(const std::string& name);
  // Null when no region of that name is exported.
  const ExportedRegion* find(const std::string& name) const;
  // The owner changed [offset, offset+length): the zero-page map is
  // recomputed there. Throws Error(kNotFound) for an unknown name.
  void mark_changed(const std::string& name, uint64_t offset, uint64_t length);

 private:
  ExportedRegion* find_locked(const std::string& name) const;

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<ExportedRegion>> regions_;  // index = key
  std::unordered_map<std::string, uint32_t> by_name_;
};

}  // namespace pagewire
