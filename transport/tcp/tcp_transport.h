// The TCP transport: one-sided reads over a TCP connection per handler
// thread, driven through io_uring so that it has the same post-a-batch /
// reap-completions shape as verbs, and so that the handler's one blocking
// wait (io_uring_submit_and_wait) covers its userfaultfd too.
#pragma once

#include <liburing.h>
#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "common/unique_fd.h"
#include "transport/protocol.h"
#include "transport/reconnect.h"
#include "transport/tcp/socket_util.h"
#include "transport/transport.h"

namespace pagewire::tcp {

class TcpTransport final : public Transport {
 public:
  // Connects and reads the region descriptor; throws pagewire::Error. With
  // t.writer, takes the region's writer lease (Error kLeased while another
  // destination holds it).
  TcpTransport(const std::string& host, uint16_t port, const std::string& name, const TransportOptions& t);

  std::string_view name() const override { return "tcp"; }
  const RegionDescriptor& region() const override { return desc_; }
  TransportCapabilities capabilities() const override;
  std::unique_ptr<Channel> open_channel(ChannelUse use = ChannelUse::kDemand) override;
  std::unique_ptr<SourceControl> open_control() override;

 private:
  Endpoint endpoint_;
  TransportOptions timeouts_;
  RegionDescriptor desc_;      // with the writer lease when opened for writing
  UniqueFd first_connection_;  // handed to the first channel
};

// Owner of one io_uring instance.
class Ring {
 public:
  // A ring that has every operation the channel uses, or null with *why
  // saying what the kernel lacks.
  static std::unique_ptr<Ring> open(unsigned entries, std::string* why);
  explicit Ring(unsigned entries);
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;
  ~Ring() { io_uring_queue_exit(&ring_); }
  io_uring* get() { return &ring_; }
  // An SQE, submitting first when the queue is full.
  io_uring_sqe* sqe();

 private:
  io_uring ring_{};
};

class TcpChannel final : public Channel {
 public:
  TcpChannel(UniqueFd connection, Endpoint endpoint, RegionDescriptor desc, TransportOptions options,
             uint8_t hello_flags = 0);
  ~TcpChannel() override;

  LocalBuffer register_buffer(std::byte* base, size_t length) override { return {base, length, 0}; }
  void post(std::span<const ReadOp> ops) override;
  // Header and payload go out in the same sendmsg as the reads around them.
  // On a channel opened without the writer lease, writes complete kLeased.
  void post_writes(std::span<const WriteOp> ops) override;
  void wait(WaitResult& out, int timeout_ms) override;
  uint64_t reconnects() const override { return reconnects_; }

  static constexpr uint32_t kMaxOutstanding = 256;

 private:
  enum Kind : uint64_t { kSend = 1, kRecv = 2, kWatch = 3 };
  // Runs of request records, and each write's payload after its header.
  static constexpr size_t kMaxSendIovs = 2 * kMaxOutstanding + 2;
  struct SendMsg {
    msghdr msg{};
    std::vector<iovec> iov = std::vector<iovec>(kMaxSendIovs);
  };

  void queue_sends();
  // Queues one request (a read, or a write with `src`), or completes it here
  // (out of bounds, dead channel, no free slot).
  void enqueue(uint32_t magic, uint64_t remote_offset, uint32_t length, std::byte* dst, const std::byte* src,
               uint64_t cookie);
  // Submits what is left of send_ after `done` bytes went out.
  void submit_send();
  void arm_recv();
  void reap(WaitResult& out);
  void on_recv(int res, WaitResult& out);
  // Arms a multishot poll for each watch added since the last wait().
  void arm_new_watches();
  void arm_watch(size_t index);
  // The connection broke: drain it, reconnect and resend what was
  // outstanding, or, past the reconnect deadline or at the stop, fail
  // every read.
  void recover(Errc why, const std::string& text, WaitResult& out);
  // One reconnect attempt: connect, say hello, check it is the same region.
  ReconnectAttempt try_reconnect(unsigned left_ms, std::string* why);
  void fail_all(Errc status, WaitResult& out);
  // Without io_uring: poll the socket and the watched descriptors, then
  // receive replies with plain recvmsg.
  void wait_with_syscalls(WaitResult& out, int timeout_ms);
  void drain_ring(WaitResult& out);

  uint8_t hello_flags_;  // said again on every reconnect, with desc_.lease when writing
  Endpoint endpoint_;
  RegionDescriptor desc_;
  TransportOptions timeouts_;
  UniqueFd sock_;
  std::unique_ptr<Ring> ring_;  // null: plain syscalls. Destroyed before the socket, drained first

  // Reads in request order: the server answers in order, so a FIFO indexed
  // by sequence number is the whole in-flight table.
  std::vector<ReadOp> ops_;
  std::vector<const std::byte*> write_src_;  // a write's payload; null for a read
  std::vector<wire::ReadRequest> requests_;  // a wire::WriteRequest has the same layout
  uint64_t head_ = 0;                        // oldest unanswered
  uint64_t sent_ = 0;                        // requests up to here are queued for sending
  uint64_t tail_ = 0;                        // next sequence number
  std::vector<ReadCompletion> local_;        // completions decided without the wire

  // One send in flight at a time: io_uring does not order separate SQEs on
  // a socket, and two batches must never interleave on the stream. The
  // msghdr stays put until its completion.
  SendMsg send_;
  bool send_inflight_ = false;
  size_t send_bytes_ = 0;  // of send_ still to go out
  wire::ReadReply reply_{};
  iovec recv_iov_[2]{};
  msghdr recv_msg_{};
  bool recv_armed_ = false;
  uint32_t socket_ops_ = 0;  // sends and recvs the kernel still holds

  size_t armed_watches_ = 0;  // watches_ below this index have their poll armed
  Errc dead_ = Errc::kOk;
  std::string dead_text_;
  std::string send_error_;                                 // a plain sendmsg failed; recovered in wait()
  std::atomic<uint64_t> reconnects_{0};                    // read by stats() from other threads
  std::chrono::steady_clock::time_point last_progress_{};  // reset by a reconnect
  std::chrono::steady_clock::time_point last_reply_{};     // only a reply moves it
};

}  // namespace pagewire::tcp
