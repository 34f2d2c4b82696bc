#include "transport/local/local_transport.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

namespace pagewire {

class LocalChannel final : public Channel {
 public:
  LocalChannel(LocalTransport* t, ChannelUse use) : t_(t), use_(use) {}

  LocalBuffer register_buffer(std::byte* base, size_t length) override { return {base, length, 0}; }
  void post(std::span<const ReadOp> ops) override {
    for (const ReadOp& op : ops) {
      if (!read_in_bounds(t_->desc_.length, op.remote_offset, op.length)) {
        ready_.push_back({{op.cookie, Errc::kOutOfBounds}, Clock::now()});
        continue;
      }
      const int64_t n = t_->reads_.fetch_add(1);
      const FaultInjection& f = t_->faults_;
      Errc status = Errc::kOk;
      if ((f.fail_after_reads >= 0 && n >= f.fail_after_reads) ||
          (use_ == ChannelUse::kDemand && op.remote_offset == f.fail_demand_offset) ||
          (use_ == ChannelUse::kBulk && op.remote_offset <= f.fail_bulk_offset &&
           f.fail_bulk_offset - op.remote_offset < op.length)) {
        status = f.status;
      } else {
        std::memcpy(op.dst, t_->base_ + op.remote_offset, op.length);
      }
      Clock::time_point due = Clock::now();
      if (use_ == ChannelUse::kBulk && f.bulk_reply_ms > 0) {
        due = std::max(due, last_due_) + std::chrono::milliseconds(f.bulk_reply_ms);
        last_due_ = due;
      }
      if (!t_->released_.load() && op.remote_offset <= f.hold_offset && f.hold_offset - op.remote_offset < op.length) {
        held_.push_back({op.cookie, status});
        t_->held_[static_cast<int>(use_)].fetch_add(1);
        continue;
      }
      ready_.push_back({{op.cookie, status}, due});
    }
  }
  void wait(WaitResult& out, int timeout_ms) override {
    take_refused_writes(out);
    take_due(out);
    // Look for the release of held reads every few milliseconds.
    if (!held_.empty()) timeout_ms = timeout_ms < 0 ? 5 : std::min(timeout_ms, 5);
    if (!out.completions.empty()) timeout_ms = 0;
    if (!ready_.empty()) {
      // Wake for the next answer due, at the latest.
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(ready_.front().due - Clock::now()).count();
      const int next = static_cast<int>(std::max<int64_t>(left, 0));
      timeout_ms = timeout_ms < 0 ? next : std::min(timeout_ms, next);
    }
    watches_.poll({}, timeout_ms, out.woken_tokens);
    take_due(out);
  }

 private:
  using Clock = std::chrono::steady_clock;
  struct Answer {
    ReadCompletion completion;
    Clock::time_point due;  // in order: each is due no earlier than the one before
  };

  void take_due(WaitResult& out) {
    if (!held_.empty() && t_->released_.load()) {
      out.completions.insert(out.completions.end(), held_.begin(), held_.end());
      held_.clear();
    }
    const auto now = Clock::now();
    size_t n = 0;
    while (n < ready_.size() && ready_[n].due <= now) out.completions.push_back(ready_[n++].completion);
    ready_.erase(ready_.begin(), ready_.begin() + static_cast<std::ptrdiff_t>(n));
  }

  LocalTransport* t_;
  ChannelUse use_;
  std::vector<Answer> ready_;
  std::vector<ReadCompletion> held_;  // FaultInjection::hold_offset's, until released
  Clock::time_point last_due_{};
};

LocalTransport::LocalTransport(const std::byte* base, uint64_t length, uint32_t page_size, FaultInjection faults)
    : base_(base), faults_(faults) {
  desc_.name = "local";
  desc_.length = length;
  desc_.page_size = page_size;
}

std::unique_ptr<Channel> LocalTransport::open_channel(ChannelUse use) {
  return std::make_unique<LocalChannel>(this, use);
}

}  // namespace pagewire
