// A transport over memory in this process: the floor that benchmarks
// measure the network against (a fault served with no network at all), and
// the fake that tests use, with optional fault injection.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "transport/transport.h"

namespace pagewire {

struct FaultInjection {
  // Reads after this many (counted over all channels) complete with
  // `status` instead of data; -1 never.
  int64_t fail_after_reads = -1;
  Errc status = Errc::kIo;
  // Reads at this offset on demand channels complete with `status`.
  uint64_t fail_demand_offset = UINT64_MAX;
  // Reads on bulk channels that cover this offset complete with `status`.
  uint64_t fail_bulk_offset = UINT64_MAX;
  // Bulk channels answer one read every this many milliseconds, in order,
  // like a slow source (0: at once).
  uint32_t bulk_reply_ms = 0;
  // Reads (on any channel) that cover this offset stay unanswered until
  // LocalTransport::release_held_reads(): a read kept in flight for as long
  // as a test needs, while the channel's other reads are answered.
  uint64_t hold_offset = UINT64_MAX;
};

class LocalTransport final : public Transport {
 public:
  LocalTransport(const std::byte* base, uint64_t length, uint32_t page_size, FaultInjection faults = {});

  std::string_view name() const override { return "local"; }
  const RegionDescriptor& region() const override { return desc_; }
  TransportCapabilities capabilities() const override { return {1024, 1u << 30}; }
  std::unique_ptr<Channel> open_channel(ChannelUse use = ChannelUse::kDemand) override;
  uint64_t reads() const { return reads_.load(); }
  // Reads held by FaultInjection::hold_offset so far on channels of `use`,
  // and their release (reads posted after it are answered at once).
  uint64_t held_reads(ChannelUse use) const { return held_[static_cast<int>(use)].load(); }
  void release_held_reads() { released_.store(true); }

 private:
  friend class LocalChannel;
  const std::byte* base_;
  RegionDescriptor desc_;
  FaultInjection faults_;
  std::atomic<int64_t> reads_{0};
  std::atomic<uint64_t> held_[3] = {0, 0, 0};  // by ChannelUse
  std::atomic<bool> released_{false};
};

}  // namespace pagewire
