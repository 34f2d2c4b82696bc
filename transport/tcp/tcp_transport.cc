#include "transport/tcp/tcp_transport.h"

#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <mutex>
#include <utility>

#include "spdlog/spdlog.h"
#include "transport/tcp/tcp_control.h"

namespace pagewire::tcp {
namespace {

constexpr unsigned kRingEntries = 512;
static_assert(TcpChannel::kMaxOutstanding + 16 < kRingEntries,
              "a full window of sends plus the recv and the watches must fit the ring");
static_assert((TcpChannel::kMaxOutstanding & (TcpChannel::kMaxOutstanding - 1)) == 0,
              "the in-flight FIFO is indexed by masking");
constexpr uint64_t kMask = TcpChannel::kMaxOutstanding - 1;
static_assert(2 * TcpChannel::kMaxOutstanding + 2 <= IOV_MAX, "a full window of writes fits one sendmsg");

constexpr uint64_t user_data(uint64_t kind, uint64_t index = 0) { return (kind << 56) | index; }
constexpr uint64_t kind_of(uint64_t data) { return data >> 56; }
constexpr uint64_t index_of(uint64_t data) { return data & ((uint64_t{1} << 56) - 1); }

std::once_flag io_mode_logged;

// Moves msg's iovecs past `done` bytes sent.
void advance(msghdr& msg, size_t done) {
  while (done > 0 && msg.msg_iovlen > 0 && done >= msg.msg_iov->iov_len) {
    done -= msg.msg_iov->iov_len;
    ++msg.msg_iov;
    --msg.msg_iovlen;
  }
  if (done > 0 && msg.msg_iovlen > 0) {
    msg.msg_iov->iov_base = static_cast<char*>(msg.msg_iov->iov_base) + done;
    msg.msg_iov->iov_len -= done;
  }
}

}  // namespace

std::unique_ptr<Ring> Ring::open(unsigned entries, std::string* why) {
  std::unique_ptr<Ring> ring;
  try {
    ring = std::make_unique<Ring>(entries);
  } catch (const Error& e) {
    *why = e.what();
    return nullptr;
  }
  io_uring_probe* probe = io_uring_get_probe_ring(ring->get());
  if (probe == nullptr) {
    *why = "io_uring cannot be probed";
    return nullptr;
  }
  std::string missing;
  for (auto [op, name] : {std::pair{IORING_OP_SENDMSG, "SENDMSG"}, std::pair{IORING_OP_RECVMSG, "RECVMSG"},
                          std::pair{IORING_OP_POLL_ADD, "POLL_ADD"}}) {
    if (!io_uring_opcode_supported(probe, op)) missing += std::string(missing.empty() ? "" : ", ") + name;
  }
  io_uring_free_probe(probe);
  if (!missing.empty()) {
    *why = "io_uring lacks " + missing;
    return nullptr;
  }
  return ring;
}

Ring::Ring(unsigned entries) {
  // COOP_TASKRUN (5.19+) spares the completion an IPI when the thread is
  // busy; older kernels refuse the flag, so fall back to plain setup.
  int rc = io_uring_queue_init(entries, &ring_, IORING_SETUP_COOP_TASKRUN);
  if (rc == -EINVAL) rc = io_uring_queue_init(entries, &ring_, 0);
  if (rc < 0) {
    throw Error(Errc::kIo, std::string("io_uring_queue_init: ") + std::strerror(-rc) +
                               " (is io_uring disabled? see sysctl kernel.io_uring_disabled)");
  }
}

io_uring_sqe* Ring::sqe() {
  io_uring_sqe* s = io_uring_get_sqe(&ring_);
  if (s == nullptr) {
    io_uring_submit(&ring_);
    s = io_uring_get_sqe(&ring_);
  }
  if (s == nullptr) throw Error(Errc::kIo, "io_uring submission queue stays full");
  return s;
}

TcpTransport::TcpTransport(const std::string& host, uint16_t port, const std::string& name, const TransportOptions& t)
    : endpoint_(resolve(host, port)), timeouts_(t) {
  std::string why;
  first_connection_ = connect_to(endpoint_, t.reconnect_timeout_ms, &why);
  if (!first_connection_) throw Error(Errc::kConnectFailed, why + " (is `pagewire serve` running there?)");
  desc_ = handshake(first_connection_.get(), name, t.reconnect_timeout_ms, endpoint_.text,
                    t.writer ? wire::kHelloWriter : 0, 0, t.key.get());
  spdlog::info("tcp: attached '{}' at {}{}: {} bytes, {} B pages", name, endpoint_.text, t.writer ? " for writing" : "",
               desc_.length, desc_.page_size);
}

TransportCapabilities TcpTransport::capabilities() const { return {TcpChannel::kMaxOutstanding, wire::kMaxReadBytes}; }

std::unique_ptr<Channel> TcpTransport::open_channel(ChannelUse use) {
  uint8_t flags = use == ChannelUse::kBulk ? wire::kHelloBulk : 0;
  // A writer's every connection, and every reconnect, presents its lease.
  if (timeouts_.writer) flags |= wire::kHelloWriter | wire::kHelloLease;
  UniqueFd fd;
  if (use == ChannelUse::kDemand) fd = std::move(first_connection_);
  if (!fd) {
    std::string why;
    fd = connect_to(endpoint_, timeouts_.reconnect_timeout_ms, &why);
    if (!fd) throw Error(Errc::kConnectFailed, why);
    RegionDescriptor d = handshake(fd.get(), desc_.name, timeouts_.reconnect_timeout_ms, endpoint_.text, flags,
                                   desc_.lease, timeouts_.key.get());
    if (d.length != desc_.length || d.page_size != desc_.page_size || d.identity != desc_.identity) {
      throw Error(Errc::kProtocol, "region '" + desc_.name + "' changed on " + endpoint_.text + " while attaching");
    }
  }
  return std::make_unique<TcpChannel>(std::move(fd), endpoint_, desc_, timeouts_, flags);
}

std::unique_ptr<SourceControl> TcpTransport::open_control() {
  return std::make_unique<TcpControl>(endpoint_, desc_, timeouts_.reconnect_timeout_ms, timeouts_.key);
}

TcpChannel::TcpChannel(UniqueFd connection, Endpoint endpoint, RegionDescriptor desc, TransportOptions options,
                       uint8_t hello_flags)
    : hello_flags_(hello_flags),
      endpoint_(std::move(endpoint)),
      desc_(std::move(desc)),
      timeouts_(options),
      sock_(std::move(connection)),
      ops_(kMaxOutstanding),
      write_src_(kMaxOutstanding),
      requests_(kMaxOutstanding) {
  local_.reserve(kMaxOutstanding);
  std::string why = "io_uring turned off by option";
  if (options.io_uring) ring_ = Ring::open(kRingEntries, &why);
  std::call_once(io_mode_logged, [&] {
    if (ring_) {
      spdlog::info("tcp: sockets driven by io_uring (features 0x{:x})", ring_->get()->features);
    } else {
      spdlog::warn("tcp: {}; using plain syscalls", why);
    }
  });
  // A reply that stops halfway must not block a plain recvmsg for good.
  if (!ring_) set_io_timeout(sock_.get(), timeouts_.request_timeout_ms);
}

TcpChannel::~TcpChannel() {
  // The kernel may still be receiving into staging memory: break the
  // connection and wait for every socket op before the ring goes away.
  // Marked dead first so that the recvs this cancels are not mistaken for
  // a dropped link and reconnected. (When the handler thread has exited,
  // io_uring has cancelled its requests already.)
  dead_ = Errc::kCancelled;
  if (sock_) ::shutdown(sock_.get(), SHUT_RDWR);
  WaitResult scratch;
  if (ring_) drain_ring(scratch);
}

void TcpChannel::drain_ring(WaitResult& out) {
  while (socket_ops_ > 0) {
    io_uring_submit_and_wait(ring_->get(), 1);
    io_uring_cqe* cqe;
    unsigned seen = 0;
    unsigned head;
    io_uring_for_each_cqe(ring_->get(), head, cqe) {
      ++seen;
      const uint64_t data = io_uring_cqe_get_data64(cqe);
      if (kind_of(data) == kSend || kind_of(data) == kRecv) {
        --socket_ops_;
      } else if (kind_of(data) == kWatch && index_of(data) < watches_.size()) {
        out.woken_tokens.push_back(watches_[index_of(data)].token);
        if ((cqe->flags & IORING_CQE_F_MORE) == 0) arm_watch(index_of(data));
      }
    }
    io_uring_cq_advance(ring_->get(), seen);
  }
  recv_armed_ = false;
  send_inflight_ = false;
}

void TcpChannel::arm_new_watches() {
  // io_uring's multishot poll reports new events only, so it never spins
  // and ignores pause_watch(); the pause matters to the level-triggered
  // poll() of the syscall path.
  while (armed_watches_ < watches_.size()) arm_watch(armed_watches_++);
}

void TcpChannel::arm_watch(size_t index) {
  io_uring_sqe* s = ring_->sqe();
  io_uring_prep_poll_multishot(s, watches_[index].fd, POLLIN);
  io_uring_sqe_set_data64(s, user_data(kWatch, index));
}

void TcpChannel::enqueue(uint32_t magic, uint64_t remote_offset, uint32_t length, std::byte* dst, const std::byte* src,
                         uint64_t cookie) {
  if (!read_in_bounds(desc_.length, remote_offset, length) || length > wire::kMaxReadBytes) {
    local_.push_back({cookie, Errc::kOutOfBounds});
    return;
  }
  if (dead_ != Errc::kOk) {
    local_.push_back({cookie, dead_});
    return;
  }
  if (tail_ - head_ >= kMaxOutstanding) {
    // The caller sized its batch wrong; refuse rather than overwrite.
    local_.push_back({cookie, Errc::kInvalidArgument});
    return;
  }
  const uint64_t seq = tail_++;
  ops_[seq & kMask] = {remote_offset, length, dst, cookie};
  write_src_[seq & kMask] = src;
  requests_[seq & kMask] = {magic, desc_.key, remote_offset, length, static_cast<uint32_t>(seq)};
}

void TcpChannel::post(std::span<const ReadOp> ops) {
  const bool was_idle = head_ == tail_;
  for (const ReadOp& op : ops) enqueue(wire::kReadMagic, op.remote_offset, op.length, op.dst, nullptr, op.cookie);
  if (was_idle && head_ != tail_) last_progress_ = last_reply_ = std::chrono::steady_clock::now();
  queue_sends();
  arm_recv();
}

void TcpChannel::post_writes(std::span<const WriteOp> ops) {
  const bool was_idle = head_ == tail_;
  for (const WriteOp& op : ops) {
    if ((hello_flags_ & wire::kHelloWriter) == 0) {
      // The server would refuse it and drop the connection: say so here.
      local_.push_back({op.cookie, Errc::kLeased});
      continue;
    }
    enqueue(wire::kWriteMagic, op.remote_offset, op.length, nullptr, op.src, op.cookie);
  }
  if (was_idle && head_ != tail_) last_progress_ = last_reply_ = std::chrono::steady_clock::now();
  queue_sends();
  arm_recv();
}

void TcpChannel::queue_sends() {
  if (sent_ == tail_ || !sock_ || send_inflight_) return;
  // One sendmsg for everything not sent yet: runs of request records as
  // they lie in the FIFO (cut where it wraps), and each write's payload
  // right after its header.
  SendMsg& m = send_;
  m.msg = {};
  size_t iovs = 0;
  size_t bytes = 0;
  for (uint64_t seq = sent_; seq != tail_; ++seq) {
    const uint64_t i = seq & kMask;
    wire::ReadRequest* record = &requests_[i];
    iovec* last = iovs > 0 ? &m.iov[iovs - 1] : nullptr;
    if (last != nullptr && static_cast<char*>(last->iov_base) + last->iov_len == reinterpret_cast<char*>(record)) {
      last->iov_len += sizeof *record;
    } else {
      m.iov[iovs++] = {record, sizeof *record};
    }
    bytes += sizeof *record;
    if (write_src_[i] != nullptr) {
      m.iov[iovs++] = {const_cast<std::byte*>(write_src_[i]), ops_[i].length};
      bytes += ops_[i].length;
    }
  }
  m.msg.msg_iov = m.iov.data();
  m.msg.msg_iovlen = iovs;
  sent_ = tail_;
  send_bytes_ = bytes;
  if (!ring_) {
    // Plain syscalls: a blocking sendmsg, resumed after partial writes.
    while (send_bytes_ > 0) {
      const ssize_t n = ::sendmsg(sock_.get(), &m.msg, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        send_error_ = "send to " + endpoint_.text + ": " + std::strerror(n < 0 ? errno : EPIPE);
        break;
      }
      send_bytes_ -= static_cast<size_t>(n);
      advance(m.msg, static_cast<size_t>(n));
    }
    return;
  }
  submit_send();
}

void TcpChannel::submit_send() {
  io_uring_sqe* s = ring_->sqe();
  // MSG_WAITALL makes io_uring finish a short send itself (6.0+); before
  // that, reap() submits the rest.
  io_uring_prep_sendmsg(s, sock_.get(), &send_.msg, MSG_NOSIGNAL | MSG_WAITALL);
  io_uring_sqe_set_data64(s, user_data(kSend));
  ++socket_ops_;
  send_inflight_ = true;
}

void TcpChannel::arm_recv() {
  if (!ring_ || recv_armed_ || head_ == sent_ || !sock_) return;
  // Header and payload in one recvmsg: the payload lands in the staging
  // slot directly.
  const ReadOp& op = ops_[head_ & kMask];
  recv_iov_[0] = {&reply_, sizeof reply_};
  recv_iov_[1] = {op.dst, op.length};
  recv_msg_ = {};
  recv_msg_.msg_iov = recv_iov_;
  recv_msg_.msg_iovlen = write_src_[head_ & kMask] != nullptr ? 1 : 2;  // a write's reply has no payload
  io_uring_sqe* s = ring_->sqe();
  io_uring_prep_recvmsg(s, sock_.get(), &recv_msg_, MSG_WAITALL);
  io_uring_sqe_set_data64(s, user_data(kRecv));
  ++socket_ops_;
  recv_armed_ = true;
}

void TcpChannel::wait(WaitResult& out, int timeout_ms) {
  if (!local_.empty()) {
    out.completions.insert(out.completions.end(), local_.begin(), local_.end());
    local_.clear();
    timeout_ms = 0;  // still collect whatever else is ready
  }
  int effective = timeout_ms;
  if (head_ != tail_) {
    // An unanswered read bounds the wait: a peer that goes silent is dead.
    const auto waited = std::chrono::steady_clock::now() - last_progress_;
    const auto left = std::chrono::milliseconds(timeouts_.request_timeout_ms) -
                      std::chrono::duration_cast<std::chrono::milliseconds>(waited);
    const int left_ms = static_cast<int>(std::max<int64_t>(left.count(), 0));
    effective = effective < 0 ? left_ms : std::min(effective, left_ms);
  }
  if (!send_error_.empty()) {
    const std::string why = std::move(send_error_);
    send_error_.clear();
    recover(Errc::kIo, why, out);
  } else if (!ring_) {
    wait_with_syscalls(out, effective);
  } else {
    arm_new_watches();
    int rc;
    if (effective < 0) {
      rc = io_uring_submit_and_wait(ring_->get(), 1);
    } else if (effective == 0) {
      rc = io_uring_submit(ring_->get());
    } else {
      __kernel_timespec ts{effective / 1000, static_cast<long long>(effective % 1000) * 1000000};
      io_uring_cqe* cqe = nullptr;
      rc = io_uring_submit_and_wait_timeout(ring_->get(), &cqe, 1, &ts, nullptr);
    }
    if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EBUSY) {
      recover(Errc::kIo, std::string("io_uring_enter: ") + std::strerror(-rc), out);
    } else {
      reap(out);
    }
  }
  if (head_ != tail_ && dead_ == Errc::kOk &&
      std::chrono::steady_clock::now() - last_progress_ >= std::chrono::milliseconds(timeouts_.request_timeout_ms)) {
    recover(Errc::kTimeout,
            "no answer from " + endpoint_.text + " within " + std::to_string(timeouts_.request_timeout_ms) + " ms",
            out);
  }
  if (dead_ != Errc::kOk) {
    out.channel_error = dead_;
    out.channel_error_text = dead_text_;
  }
}

void TcpChannel::wait_with_syscalls(WaitResult& out, int timeout_ms) {
  const bool expecting = sock_ && head_ != sent_;
  pollfd socket{expecting ? sock_.get() : -1, POLLIN, 0};
  const int rc = watches_.poll({&socket, 1}, timeout_ms, out.woken_tokens);
  if (rc <= 0) return;  // timeout or EINTR: the caller checks the deadline
  if (!expecting || socket.revents == 0) return;
  // Take every reply that is already here; each recvmsg waits for a whole
  // reply (bounded by SO_RCVTIMEO).
  for (;;) {
    const ReadOp& op = ops_[head_ & kMask];
    iovec iov[2] = {{&reply_, sizeof reply_}, {op.dst, op.length}};
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = write_src_[head_ & kMask] != nullptr ? 1 : 2;
    ssize_t n = ::recvmsg(sock_.get(), &msg, MSG_WAITALL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      recover(Errc::kTimeout, "reply from " + endpoint_.text + " stopped halfway", out);
      return;
    }
    on_recv(n < 0 ? -errno : static_cast<int>(n), out);
    if (!sock_ || dead_ != Errc::kOk || head_ == sent_) return;
    pollfd more{sock_.get(), POLLIN, 0};
    if (::poll(&more, 1, 0) <= 0) return;
  }
}

void TcpChannel::reap(WaitResult& out) {
  io_uring_cqe* cqe;
  unsigned seen = 0;
  unsigned head;
  // Recv completions may re-arm and fail the connection; collect first.
  int recv_res = 0;
  bool got_recv = false;
  int send_err = 0;
  io_uring_for_each_cqe(ring_->get(), head, cqe) {
    ++seen;
    const uint64_t data = io_uring_cqe_get_data64(cqe);
    switch (kind_of(data)) {
      case kSend:
        --socket_ops_;
        send_inflight_ = false;
        if (cqe->res < 0) {
          send_err = -cqe->res;
        } else if (cqe->res == 0 && send_bytes_ > 0) {
          send_err = EPIPE;
        } else if (static_cast<size_t>(cqe->res) < send_bytes_ && sock_ && dead_ == Errc::kOk) {
          // A short send (a kernel without MSG_WAITALL for sends, or a
          // signal): the rest goes next, before anything else is queued.
          send_bytes_ -= static_cast<size_t>(cqe->res);
          advance(send_.msg, static_cast<size_t>(cqe->res));
          submit_send();
        }
        break;
      case kRecv:
        --socket_ops_;
        got_recv = true;
        recv_res = cqe->res;
        break;
      case kWatch: {
        const size_t index = index_of(data);
        if (index < watches_.size()) {
          out.woken_tokens.push_back(watches_[index].token);
          if ((cqe->flags & IORING_CQE_F_MORE) == 0) arm_watch(index);
        }
        break;
      }
      default: break;
    }
  }
  io_uring_cq_advance(ring_->get(), seen);
  const uint64_t reconnects_before = reconnects_.load();
  if (got_recv) on_recv(recv_res, out);
  // A send error from the connection that on_recv just replaced is stale.
  if (send_err != 0 && dead_ == Errc::kOk && sock_ && reconnects_.load() == reconnects_before) {
    recover(Errc::kIo, "send to " + endpoint_.text + ": " + std::strerror(send_err), out);
  }
  queue_sends();  // what was posted while the last send was in flight
  arm_recv();     // and its replies: on_recv found nothing sent to arm for
}

void TcpChannel::on_recv(int res, WaitResult& out) {
  recv_armed_ = false;
  if (!sock_ || dead_ != Errc::kOk) return;  // draining a connection already given up
  const ReadOp& op = ops_[head_ & kMask];
  if (res < 0) {
    recover(Errc::kIo, "recv from " + endpoint_.text + ": " + std::strerror(-res), out);
    return;
  }
  if (static_cast<size_t>(res) < sizeof reply_) {
    recover(Errc::kClosed, "connection to " + endpoint_.text + " closed", out);
    return;
  }
  if (reply_.magic != wire::kReplyMagic || reply_.tag != static_cast<uint32_t>(head_)) {
    recover(Errc::kProtocol, "garbled reply from " + endpoint_.text, out);
    return;
  }
  const auto status = static_cast<Errc>(reply_.status);
  if (status != Errc::kOk) {
    // The server refused this read and closes the connection after saying
    // so; the rest are sent again on a new one.
    out.completions.push_back({op.cookie, status});
    ++head_;
    last_progress_ = std::chrono::steady_clock::now();
    recover(Errc::kClosed, "server refused a read: " + std::string(to_string(status)), out);
    return;
  }
  const uint32_t payload = write_src_[head_ & kMask] != nullptr ? 0 : op.length;
  if (reply_.length != payload || static_cast<size_t>(res) != sizeof reply_ + payload) {
    recover(Errc::kClosed, "short reply from " + endpoint_.text, out);
    return;
  }
  out.completions.push_back({op.cookie, Errc::kOk});
  ++head_;
  last_progress_ = last_reply_ = std::chrono::steady_clock::now();
  arm_recv();
}

void TcpChannel::recover(Errc why, const std::string& text, WaitResult& out) {
  if (dead_ != Errc::kOk) return;
  if (head_ == tail_) {
    // Nothing lost: most likely the server closed it for idleness
    // (ServerOptions::idle_timeout_ms).
    spdlog::info("tcp: {} with no request outstanding; reconnecting", text);
  } else {
    spdlog::warn("tcp: {} ({} requests outstanding); reconnecting", text, tail_ - head_);
  }
  // Break the connection and take back every op the kernel holds on it.
  ::shutdown(sock_.get(), SHUT_RDWR);
  if (ring_) drain_ring(out);
  sock_.reset();

  std::string last_why = text;
  // A peer that accepts connections but never answers would have us
  // reconnect forever: past one request timeout plus one reconnect timeout
  // without a reply, it is dead.
  const bool stalled = head_ != tail_ &&
                       std::chrono::steady_clock::now() - last_reply_ >
                           std::chrono::milliseconds(timeouts_.request_timeout_ms + timeouts_.reconnect_timeout_ms);
  ReconnectEnd end = ReconnectEnd::kGaveUp;
  if (stalled) {
    last_why = "no reply since the last reconnect";
  } else {
    end = reconnect(timeouts_.reconnect_timeout_ms, watches_, &last_why,
                    [this](unsigned left_ms, std::string* why_not) { return try_reconnect(left_ms, why_not); });
  }
  if (end == ReconnectEnd::kConnected) {
    ++reconnects_;
    spdlog::info("tcp: reconnected to {}; resending {} requests", endpoint_.text, tail_ - head_);
    for (uint64_t seq = head_; seq != tail_; ++seq) requests_[seq & kMask].key = desc_.key;
    sent_ = head_;
    last_progress_ = std::chrono::steady_clock::now();
    queue_sends();
    arm_recv();
    return;
  }
  if (end == ReconnectEnd::kStopped) {
    // The engine is going away: it reads no more from this channel.
    dead_ = Errc::kCancelled;
    dead_text_ = text + "; stopped while reconnecting";
    spdlog::info("tcp: {}", dead_text_);
    watches_.report_stop(out.woken_tokens);
    fail_all(Errc::kCancelled, out);
    return;
  }
  dead_ = why;
  dead_text_ = text + "; reconnect failed: " + last_why;
  spdlog::error("tcp: giving up on {}: {}", endpoint_.text, dead_text_);
  fail_all(why, out);
}

ReconnectAttempt TcpChannel::try_reconnect(unsigned left_ms, std::string* why) {
  UniqueFd fd = connect_to(endpoint_, left_ms, why, watches_.stop_fd());
  if (!fd) return ReconnectAttempt::kRetry;
  try {
    RegionDescriptor d = handshake(fd.get(), desc_.name, left_ms, endpoint_.text, hello_flags_, desc_.lease,
                                   timeouts_.key.get());
    if (d.length != desc_.length || d.page_size != desc_.page_size) {
      *why = "region '" + desc_.name + "' changed shape on " + endpoint_.text;
      return ReconnectAttempt::kGiveUp;  // never read a different region into these pages
    }
    if (d.identity != desc_.identity) {
      *why = endpoint_.text + " now serves other bytes as '" + desc_.name + "' (the source was restarted)";
      return ReconnectAttempt::kGiveUp;
    }
    desc_.key = d.key;
    sock_ = std::move(fd);
    if (!ring_) set_io_timeout(sock_.get(), timeouts_.request_timeout_ms);
    return ReconnectAttempt::kConnected;
  } catch (const Error& e) {
    *why = e.what();
    // Writes must never go to a region this destination no longer holds
    // (the server restarted, or another writer took it).
    if (e.code() == Errc::kLeased) return ReconnectAttempt::kGiveUp;
    // Not found is tried again too: a restarted source listens a moment
    // before it exports its regions.
    return ReconnectAttempt::kRetry;
  }
}

void TcpChannel::fail_all(Errc status, WaitResult& out) {
  for (; head_ != tail_; ++head_) out.completions.push_back({ops_[head_ & kMask].cookie, status});
  sent_ = tail_;
}

}  // namespace pagewire::tcp
