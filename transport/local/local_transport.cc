#include "transport/local/local_transport.h"

#include <poll.h>

#include <cerrno>
#include <cstring>
#include <vector>

namespace pagewire {

class LocalChannel final : public Channel {
 public:
  explicit LocalChannel(LocalTransport* t) : t_(t) {}

  LocalBuffer register_buffer(std::byte* base, size_t length) override { return {base, length, 0}; }
  void watch(int fd, uint64_t token) override {
    fds_.push_back({fd, POLLIN, 0});
    tokens_.push_back(token);
  }
  void pause_watch(uint64_t token, bool paused) override {
    for (size_t i = 0; i < tokens_.size(); ++i) {
      if (tokens_[i] == token) fds_[i].fd = paused ? -(real_fd(fds_[i].fd) + 1) : real_fd(fds_[i].fd);
    }
  }
  void post(std::span<const ReadOp> ops) override {
    for (const ReadOp& op : ops) {
      if (!read_in_bounds(t_->desc_.length, op.remote_offset, op.length)) {
        ready_.push_back({op.cookie, Errc::kOutOfBounds});
        continue;
      }
      const int64_t n = t_->reads_.fetch_add(1);
      if (t_->faults_.fail_after_reads >= 0 && n >= t_->faults_.fail_after_reads) {
        ready_.push_back({op.cookie, t_->faults_.status});
        continue;
      }
      std::memcpy(op.dst, t_->base_ + op.remote_offset, op.length);
      ready_.push_back({op.cookie, Errc::kOk});
    }
  }
  uint32_t outstanding() const override { return static_cast<uint32_t>(ready_.size()); }
  void wait(WaitResult& out, int timeout_ms) override {
    if (!ready_.empty()) {
      out.completions.insert(out.completions.end(), ready_.begin(), ready_.end());
      ready_.clear();
      timeout_ms = 0;
    }
    int rc = ::poll(fds_.data(), fds_.size(), timeout_ms);
    if (rc <= 0) return;
    for (size_t i = 0; i < fds_.size(); ++i) {
      if (fds_[i].revents != 0) out.woken_tokens.push_back(tokens_[i]);
    }
  }

 private:
  // poll() skips negative descriptors; a paused fd is stored as -(fd + 1).
  static int real_fd(int fd) { return fd < 0 ? -fd - 1 : fd; }

  LocalTransport* t_;
  std::vector<pollfd> fds_;
  std::vector<uint64_t> tokens_;
  std::vector<ReadCompletion> ready_;
};

LocalTransport::LocalTransport(const std::byte* base, uint64_t length, uint32_t page_size, FaultInjection faults)
    : base_(base), faults_(faults) {
  desc_.name = "local";
  desc_.length = length;
  desc_.page_size = page_size;
}

std::unique_ptr<Channel> LocalTransport::open_channel(ChannelUse) { return std::make_unique<LocalChannel>(this); }

}  // namespace pagewire
