#include "runtime/snapshot_sink.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/auth.h"
#include "common/unique_fd.h"
#include "transport/transport.h"
#include "transport/zero_map.h"

namespace pagewire {
namespace {

// A plain image: page i of the range at offset i * page_size. It starts
// as a hole of the range's length, so zero pages are never written.
class FileSink final : public SnapshotSink {
 public:
  FileSink(const std::string& path, uint64_t length) : path_(path) {
    fd_.reset(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd_) throw_errno("snapshot: open " + path);
    if (::ftruncate(fd_.get(), static_cast<off_t>(length)) != 0) throw_errno("snapshot: ftruncate " + path);
  }
  std::string describe() const override { return "file " + path_; }
  void register_memory(std::byte*, size_t) override {}
  uint32_t depth() const override { return 16; }
  uint32_t max_write() const override { return 1u << 30; }
  bool needs_zeros(uint64_t) const override { return false; }
  void post(uint64_t offset, const std::byte* data, uint32_t length, uint64_t cookie) override {
    size_t done = 0;
    while (done < length) {
      const ssize_t n = ::pwrite(fd_.get(), data + done, length - done, static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw Error(Errc::kIo, "snapshot: writing " + path_ + ": " + std::strerror(n < 0 ? errno : EIO));
      done += static_cast<size_t>(n);
    }
    done_.push_back(cookie);
  }
  void reap(std::vector<uint64_t>& done, int) override {
    done.insert(done.end(), done_.begin(), done_.end());
    done_.clear();
  }
  void finish() override {
    if (::fsync(fd_.get()) != 0) throw_errno("snapshot: fsync " + path_);
  }

 private:
  std::string path_;
  UniqueFd fd_;
  std::vector<uint64_t> done_;
};

// A memory node's region, written as its writer over TCP or RDMA.
class NodeSink final : public SnapshotSink {
 public:
  NodeSink(const std::string& uri, uint64_t length, size_t page_size, const SnapshotOptions& o) : uri_(uri) {
    TransportOptions t;
    t.writer = true;
    t.reconnect_timeout_ms = o.reconnect_timeout_ms;
    t.key = AuthKey::from_option(o.key_file);
    transport_ = connect_transport(uri, t);
    const RegionDescriptor& d = transport_->region();
    if (d.length < length || d.page_size != page_size) {
      throw Error(Errc::kInvalidArgument, "snapshot: " + uri + " holds " + std::to_string(d.length) + " bytes in " +
                                              std::to_string(d.page_size) + " B pages; the range needs " +
                                              std::to_string(length) + " bytes in " + std::to_string(page_size) +
                                              " B pages");
    }
    zero_map_ = d.zero_map;
    page_size_ = page_size;
    channel_ = transport_->open_channel(ChannelUse::kWrite);
    const TransportCapabilities caps = transport_->capabilities();
    depth_ = std::clamp<uint32_t>(caps.max_outstanding_reads, 1, 64);
    // An RDMA writer's staging slot holds a page of up to 64 KiB.
    max_write_ = static_cast<uint32_t>(std::min<uint64_t>({caps.max_read_bytes, page_size, 64u << 10}));
  }
  std::string describe() const override {
    return "memory node " + uri_ + " (over " + std::string(transport_->name()) + ")";
  }
  void register_memory(std::byte* base, size_t length) override { channel_->register_buffer(base, length); }
  uint32_t depth() const override { return depth_; }
  uint32_t max_write() const override { return max_write_; }
  bool needs_zeros(uint64_t offset) const override {
    return zero_map_.empty() || !is_zero_page(zero_map_, offset / page_size_);
  }
  void post(uint64_t offset, const std::byte* data, uint32_t length, uint64_t cookie) override {
    const WriteOp op{offset, length, data, cookie};
    channel_->post_writes({&op, 1});
  }
  void reap(std::vector<uint64_t>& done, int timeout_ms) override {
    result_.clear();
    channel_->wait(result_, timeout_ms);
    for (const ReadCompletion& c : result_.completions) {
      if (c.status != Errc::kOk) {
        throw Error(c.status, "snapshot: writing to " + uri_ + ": " +
                                  (result_.channel_error_text.empty() ? std::string(to_string(c.status))
                                                                      : result_.channel_error_text));
      }
      done.push_back(c.cookie);
    }
    if (result_.channel_error != Errc::kOk) {
      throw Error(result_.channel_error, "snapshot: " + uri_ + ": " + result_.channel_error_text);
    }
  }
  void finish() override {}  // every write was acknowledged: it is in the node's memory

 private:
  std::string uri_;
  std::unique_ptr<Transport> transport_;
  std::unique_ptr<Channel> channel_;
  ZeroMap zero_map_;
  size_t page_size_ = 4096;
  uint32_t depth_ = 1;
  uint32_t max_write_ = 4096;
  WaitResult result_;
};

}  // namespace

std::unique_ptr<SnapshotSink> open_snapshot_sink(const std::string& target, uint64_t length, size_t page_size,
                                                 const SnapshotOptions& options) {
  if (target.empty()) throw Error(Errc::kInvalidArgument, "snapshot: no target (a file path, or a node's URI)");
  if (target.rfind("file:", 0) == 0) return std::make_unique<FileSink>(target.substr(5), length);
  if (target.find("://") != std::string::npos) {
    return std::make_unique<NodeSink>(target, length, page_size, options);
  }
  return std::make_unique<FileSink>(target, length);
}

}  // namespace pagewire
