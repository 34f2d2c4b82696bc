// Where a live snapshot's pages go (pagewire/snapshot.h): a sparse image
// file, or a memory node's region written as its writer. The saver posts
// writes from memory it registered here and reaps their completions; a
// sink that fails throws Error, and the snapshot fails with it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "pagewire/snapshot.h"

namespace pagewire {

class SnapshotSink {
 public:
  virtual ~SnapshotSink() = default;
  virtual std::string describe() const = 0;
  // The memory writes are posted from (RDMA sends it as it is).
  virtual void register_memory(std::byte* base, size_t length) = 0;
  // Writes in flight at most, and the most bytes one write may carry.
  virtual uint32_t depth() const = 0;
  virtual uint32_t max_write() const = 0;
  // Whether a page of zeros must be written at `offset` (false where the
  // target holds zeros there already: a fresh file, a node page never
  // written).
  virtual bool needs_zeros(uint64_t offset) const = 0;
  virtual void post(uint64_t offset, const std::byte* data, uint32_t length, uint64_t cookie) = 0;
  // Appends the cookies of writes done; waits up to timeout_ms for one.
  virtual void reap(std::vector<uint64_t>& done, int timeout_ms) = 0;
  // Everything written is durable where the target keeps it.
  virtual void finish() = 0;
};

// `target` as snapshot() takes it; `length` is the range's. Throws Error.
std::unique_ptr<SnapshotSink> open_snapshot_sink(const std::string& target, uint64_t length, size_t page_size,
                                                 const SnapshotOptions& options);

}  // namespace pagewire
