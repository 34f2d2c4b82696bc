// A handler thread's staging slots: page-sized buffers in one mapping,
// registered with the thread's channel once. Used by that thread alone.
// With slot_bytes 0 it only hands out slot numbers (shared memory, where
// reads land in the final pages).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/unique_fd.h"
#include "transport/transport.h"

namespace pagewire {

class StagingPool {
 public:
  StagingPool(Channel& channel, uint32_t slots, uint32_t slot_bytes) : slot_bytes_(slot_bytes) {
    if (slot_bytes > 0) {
      memory_ = Mapping::anonymous(size_t{slots} * slot_bytes);
      // Touch every slot now so the fast path never takes a first-touch fault.
      for (size_t off = 0; off < memory_.size(); off += 4096) memory_.data()[off] = std::byte{0};
      buffer_ = channel.register_buffer(memory_.data(), memory_.size());
    }
    free_.reserve(slots);
    for (uint32_t i = slots; i > 0; --i) free_.push_back(i - 1);
  }

  bool empty() const { return free_.empty(); }
  uint32_t available() const { return static_cast<uint32_t>(free_.size()); }
  uint32_t acquire() {
    const uint32_t s = free_.back();
    free_.pop_back();
    return s;
  }
  void release(uint32_t slot) { free_.push_back(slot); }
  std::byte* at(uint32_t slot) const { return memory_.data() + size_t{slot} * slot_bytes_; }

 private:
  uint32_t slot_bytes_;
  Mapping memory_;
  LocalBuffer buffer_;
  std::vector<uint32_t> free_;
};

}  // namespace pagewire
