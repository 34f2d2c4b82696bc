#include "transport/rdma/rdma_transport.h"

#include <fcntl.h>
#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "common/unique_fd.h"
#include "spdlog/spdlog.h"
#include "transport/protocol.h"
#include "transport/tcp/socket_util.h"
#include "transport/tcp/tcp_control.h"

namespace pagewire::rdma {
namespace {

constexpr uint32_t kMaxDepth = 256;
static_assert(RdmaChannel::kSignalEvery < kMaxDepth, "a signalled read must fit in every send queue");

unsigned setup_timeout(const TransportOptions& o) { return std::max(o.reconnect_timeout_ms, 500u); }

// Waits for the cm event that ends a setup step; throws with what the peer
// or the fabric said otherwise. The caller acks the returned event.
rdma_cm_event* expect(rdma_event_channel* ec, rdma_cm_event_type want, unsigned timeout_ms, const std::string& step,
                      const std::string& peer) {
  rdma_cm_event* ev = next_event(ec, static_cast<int>(timeout_ms));
  if (ev == nullptr) {
    throw Error(Errc::kTimeout, step + " " + peer + ": no answer within " + std::to_string(timeout_ms) + " ms");
  }
  if (ev->event == want) return ev;
  const rdma_cm_event_type got = ev->event;
  const int status = ev->status;
  HelloReply reply{};
  const bool ours = ev->param.conn.private_data != nullptr && ev->param.conn.private_data_len >= sizeof reply &&
                    (std::memcpy(&reply, ev->param.conn.private_data, sizeof reply), reply.magic == kHelloMagic);
  rdma_ack_cm_event(ev);
  if (got == RDMA_CM_EVENT_REJECTED && ours) {
    const auto code = static_cast<Errc>(reply.status);
    throw Error(code, peer + " refused the connection: " + std::string(to_string(code)));
  }
  switch (got) {
    case RDMA_CM_EVENT_ADDR_ERROR:
      throw Error(Errc::kConnectFailed, "cannot resolve " + peer +
                                            " to a local RDMA device (is an RDMA device, e.g. rxe0, bound to the "
                                            "interface that reaches it?)");
    case RDMA_CM_EVENT_ROUTE_ERROR: throw Error(Errc::kConnectFailed, "no RDMA route to " + peer);
    case RDMA_CM_EVENT_REJECTED:
      throw Error(Errc::kConnectFailed, "connection to " + peer + " rejected (reason " + std::to_string(status) +
                                            "): is `pagewire serve` running there with RDMA?");
    case RDMA_CM_EVENT_UNREACHABLE:
    case RDMA_CM_EVENT_CONNECT_ERROR:
      throw Error(Errc::kConnectFailed, peer + " does not answer over RDMA (" + rdma_event_str(got) + ")");
    default: throw Error(Errc::kProtocol, step + " " + peer + ": unexpected " + rdma_event_str(got));
  }
}

}  // namespace

std::unique_ptr<SourceControl> RdmaTransport::open_control() {
  return std::make_unique<tcp::TcpControl>(endpoint_, desc_, options_.reconnect_timeout_ms, options_.key);
}

RdmaTransport::RdmaTransport(const std::string& host, uint16_t port, const std::string& name, const TransportOptions& o)
    : endpoint_(resolve(host, port)), name_(name), options_(o) {
  if (o.writer) {
    throw Error(Errc::kUnsupported, "rdma://" + endpoint_.text + "/" + name +
                                        ": writes to memory nodes go over TCP only for now; use tcp:// to write");
  }
  if (name.empty() || name.size() > kMaxRdmaName) {
    throw Error(Errc::kBadUri, "an rdma:// region name must be 1.." + std::to_string(kMaxRdmaName) + " bytes");
  }
  if (!have_device()) {
    throw Error(Errc::kConnectFailed,
                "no RDMA device here (ibv_devices lists none): use tcp://, or run under tools/rxe-vm for Soft-RoCE");
  }
  first_ = std::make_unique<Connection>(connect_one());
  const HelloReply& r = first_->reply;
  desc_.name = name;
  desc_.length = r.length;
  desc_.page_size = r.page_size;
  desc_.key = r.rkey;
  desc_.remote_addr = r.remote_addr;
  desc_.identity = r.identity;
  if (r.length == 0 || r.page_size == 0 || (r.page_size & (r.page_size - 1)) != 0) {
    throw Error(Errc::kProtocol, endpoint_.text + " sent an invalid region descriptor");
  }
  fetch_zero_map(*first_);
  spdlog::info("rdma: attached '{}' at {} on {} port {}: {} bytes, {} B pages", name, endpoint_.text,
               ibv_get_device_name(first_->id->verbs->device), first_->id->port_num, desc_.length, desc_.page_size);
}

void RdmaTransport::fetch_zero_map(Connection& c) {
  const HelloReply& r = c.reply;
  const uint64_t pages = (desc_.length + desc_.page_size - 1) / desc_.page_size;
  if (r.zero_map_bytes == 0) return;
  if (r.zero_map_bytes != (pages + 63) / 64 * 8) {
    throw Error(Errc::kProtocol, endpoint_.text + " sent a zero-page map of the wrong size");
  }
  ZeroMap map(r.zero_map_bytes / 8);
  Mr mr(ibv_reg_mr(pd_.get(), map.data(), r.zero_map_bytes, IBV_ACCESS_LOCAL_WRITE));
  if (!mr) throw_errno("ibv_reg_mr for the zero-page map");
  ibv_sge sge{reinterpret_cast<uint64_t>(map.data()), r.zero_map_bytes, mr->lkey};
  ibv_send_wr wr{};
  wr.wr_id = 1;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_RDMA_READ;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.wr.rdma.remote_addr = r.zero_map_addr;
  wr.wr.rdma.rkey = r.zero_map_rkey;
  ibv_send_wr* bad = nullptr;
  if (const int rc = ibv_post_send(c.id->qp, &wr, &bad); rc != 0) {
    throw Error(Errc::kIo, std::string("posting the zero-page map read: ") + std::strerror(rc));
  }
  // Setup path: poll until the one completion arrives.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(setup_timeout(options_));
  ibv_wc wc{};
  int n = 0;
  while ((n = ibv_poll_cq(c.cq.get(), 1, &wc)) == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  if (n != 1 || wc.status != IBV_WC_SUCCESS) {
    throw Error(Errc::kIo, "reading the zero-page map from " + endpoint_.text + ": " +
                               (n == 1 ? wc_status(wc.status) : "no completion"));
  }
  desc_.zero_map = std::move(map);
}

RdmaTransport::~RdmaTransport() {
  // A connection never handed to a channel goes before the PD.
  first_.reset();
}

TransportCapabilities RdmaTransport::capabilities() const {
  const auto depth = std::min<uint32_t>(kMaxDepth, static_cast<uint32_t>(device_.max_qp_wr));
  return {depth, static_cast<uint32_t>(std::min<uint64_t>(device_.max_mr_size, 1u << 30))};
}

Connection RdmaTransport::connect_one() {
  const unsigned timeout = setup_timeout(options_);
  Connection c;
  c.events = make_event_channel();
  rdma_cm_id* raw = nullptr;
  if (rdma_create_id(c.events.get(), &raw, nullptr, RDMA_PS_TCP) != 0) throw_errno("rdma_create_id");
  CmId id(raw);
  if (rdma_resolve_addr(id.get(), nullptr, reinterpret_cast<sockaddr*>(&endpoint_.addr), static_cast<int>(timeout)) !=
      0) {
    throw Error(Errc::kConnectFailed, "rdma_resolve_addr " + endpoint_.text + ": " + std::strerror(errno));
  }
  rdma_ack_cm_event(expect(c.events.get(), RDMA_CM_EVENT_ADDR_RESOLVED, timeout, "resolving", endpoint_.text));
  if (rdma_resolve_route(id.get(), static_cast<int>(timeout)) != 0) throw_errno("rdma_resolve_route");
  rdma_ack_cm_event(expect(c.events.get(), RDMA_CM_EVENT_ROUTE_RESOLVED, timeout, "routing to", endpoint_.text));

  ibv_context* ctx = id->verbs;
  if (!pd_) {
    // Query the limits once, on the device the route picked.
    if (ibv_query_device(ctx, &device_) != 0) throw_errno("ibv_query_device");
    ibv_pd* pd = ibv_alloc_pd(ctx);
    if (pd == nullptr) throw_errno("ibv_alloc_pd");
    pd_.reset(pd);
  } else if (pd_->context != ctx) {
    throw Error(Errc::kConnectFailed, "the route to " + endpoint_.text + " moved to another RDMA device");
  }
  ibv_port_attr port{};
  if (ibv_query_port(ctx, id->port_num, &port) != 0) throw_errno("ibv_query_port");
  if (port.state != IBV_PORT_ACTIVE) {
    throw Error(Errc::kConnectFailed, std::string("RDMA device ") + ibv_get_device_name(ctx->device) + " port " +
                                          std::to_string(id->port_num) + " is not active (" +
                                          ibv_port_state_str(port.state) + ")");
  }

  c.depth = std::min<uint32_t>(kMaxDepth, static_cast<uint32_t>(device_.max_qp_wr));
  ibv_comp_channel* comp = ibv_create_comp_channel(ctx);
  if (comp == nullptr) throw_errno("ibv_create_comp_channel");
  c.comp.reset(comp);
  ::fcntl(comp->fd, F_SETFL, ::fcntl(comp->fd, F_GETFL) | O_NONBLOCK);
  const int cqe = std::min<int>(static_cast<int>(c.depth) + 1, device_.max_cqe);
  ibv_cq* cq = ibv_create_cq(ctx, cqe, nullptr, comp, 0);
  if (cq == nullptr) throw_errno("ibv_create_cq");
  c.cq.reset(cq);
  ibv_qp_init_attr qa{};
  qa.send_cq = cq;
  qa.recv_cq = cq;
  qa.qp_type = IBV_QPT_RC;
  qa.cap.max_send_wr = c.depth;
  qa.cap.max_recv_wr = 1;
  qa.cap.max_send_sge = 1;
  qa.cap.max_recv_sge = 1;
  qa.sq_sig_all = 0;
  if (rdma_create_qp(id.get(), pd_.get(), &qa) != 0) throw_errno("rdma_create_qp");
  c.depth = std::min(c.depth, qa.cap.max_send_wr);

  Hello hello{};
  hello.magic = kHelloMagic;
  hello.version = kRdmaVersion;
  hello.name_length = static_cast<uint8_t>(name_.size());
  RegionDescriptor proved;  // what the TCP handshake that proved the key said
  if (options_.key != nullptr) {
    proved = ticket(timeout);
    hello.flags = kRdmaTicket;
    hello.ticket = proved.ticket;
  }
  std::memcpy(hello.name, name_.data(), name_.size());
  rdma_conn_param param{};
  param.private_data = &hello;
  param.private_data_len = sizeof hello;
  // Reads in flight at once are bounded by what this device may initiate.
  param.initiator_depth = static_cast<uint8_t>(std::min(device_.max_qp_init_rd_atom, 16));
  param.responder_resources = 0;
  param.retry_count = 7;
  param.rnr_retry_count = 7;
  if (rdma_connect(id.get(), &param) != 0) throw_errno("rdma_connect");
  rdma_cm_event* ev = expect(c.events.get(), RDMA_CM_EVENT_ESTABLISHED, timeout, "connecting to", endpoint_.text);
  const bool ok = ev->param.conn.private_data != nullptr && ev->param.conn.private_data_len >= sizeof c.reply;
  if (ok) std::memcpy(&c.reply, ev->param.conn.private_data, sizeof c.reply);
  rdma_ack_cm_event(ev);
  if (!ok || c.reply.magic != kHelloMagic || c.reply.status != 0) {
    throw Error(Errc::kProtocol, endpoint_.text + " does not speak the pagewire RDMA protocol");
  }
  if (options_.key != nullptr && (c.reply.identity != proved.identity || c.reply.length != proved.length ||
                                  c.reply.page_size != proved.page_size)) {
    throw Error(Errc::kProtocol,
                endpoint_.text + " answered over RDMA for another region than the one it proved " + "over TCP");
  }
  c.id = std::move(id);
  return c;
}

RegionDescriptor RdmaTransport::ticket(unsigned timeout_ms) {
  // Proves the key over TCP (and has the server prove it back); the server
  // answers with a ticket good for one RDMA connect, within seconds.
  std::string why;
  UniqueFd fd = tcp::connect_to(endpoint_, timeout_ms, &why);
  if (!fd) throw Error(Errc::kConnectFailed, "asking for an RDMA ticket over TCP: " + why);
  const RegionDescriptor d = tcp::handshake(fd.get(), name_, timeout_ms, endpoint_.text, wire::kHelloTicket, 0,
                                            options_.key.get());
  if (desc_.identity != 0 && d.identity != desc_.identity) {
    throw Error(Errc::kProtocol, "region '" + name_ + "' on " + endpoint_.text + " is not the one attached");
  }
  return d;
}

std::unique_ptr<Channel> RdmaTransport::open_channel(ChannelUse) {
  Connection c = first_ ? std::move(*first_) : connect_one();
  first_.reset();
  if (c.reply.length != desc_.length || c.reply.page_size != desc_.page_size || c.reply.identity != desc_.identity) {
    throw Error(Errc::kProtocol, "region '" + name_ + "' changed on " + endpoint_.text + " while attaching");
  }
  RegionDescriptor d = desc_;
  d.key = c.reply.rkey;
  d.remote_addr = c.reply.remote_addr;
  if (!mrs_) mrs_ = std::make_shared<MrCache>(pd_.get());
  // Channels go before their transport, so the connector may hold it.
  return std::make_unique<RdmaChannel>(
      std::move(c), [this] { return connect_one(); }, mrs_, d, options_);
}

std::shared_ptr<ibv_mr> MrCache::get(std::byte* base, size_t length) {
  std::lock_guard lock(mu_);
  std::erase_if(mrs_, [](const std::weak_ptr<ibv_mr>& w) { return w.expired(); });
  for (const auto& w : mrs_) {
    if (auto mr = w.lock(); mr && mr->addr == base && mr->length == length) return mr;
  }
  ibv_mr* mr = ibv_reg_mr(pd_, base, length, IBV_ACCESS_LOCAL_WRITE);
  if (mr == nullptr) {
    throw_errno("ibv_reg_mr of " + std::to_string(length) +
                " bytes (staging buffers, or a shared-memory region's alias; registration pins them and counts "
                "against RLIMIT_MEMLOCK: see ulimit -l)");
  }
  std::shared_ptr<ibv_mr> owned(mr, [](ibv_mr* m) { ibv_dereg_mr(m); });
  mrs_.push_back(owned);
  return owned;
}

RdmaChannel::RdmaChannel(Connection conn, Connector connect, std::shared_ptr<MrCache> mrs, RegionDescriptor desc,
                         TransportOptions options)
    : connect_(std::move(connect)),
      cache_(std::move(mrs)),
      desc_(std::move(desc)),
      options_(options),
      conn_(std::move(conn)),
      fifo_(conn_.depth) {
  wrs_.resize(conn_.depth);
  sges_.resize(conn_.depth);
  local_.reserve(conn_.depth);
}

RdmaChannel::~RdmaChannel() { teardown(); }

void RdmaChannel::teardown() {
  if (conn_.id) rdma_disconnect(conn_.id.get());
  if (unacked_cq_events_ > 0 && conn_.cq) ibv_ack_cq_events(conn_.cq.get(), unacked_cq_events_);
  unacked_cq_events_ = 0;
  // The QP first: once it is destroyed no read of it writes our memory.
  conn_.id.reset();
  conn_.cq.reset();
  conn_.comp.reset();
  conn_.events.reset();
}

LocalBuffer RdmaChannel::register_buffer(std::byte* base, size_t length) {
  std::shared_ptr<ibv_mr> mr = cache_->get(base, length);
  mrs_.push_back(mr);
  return {base, length, mr->lkey};
}

uint32_t RdmaChannel::lkey_for(const std::byte* p) const {
  for (const auto& mr : mrs_) {
    const auto* b = static_cast<const std::byte*>(mr->addr);
    if (p >= b && p < b + mr->length) return mr->lkey;
  }
  return 0;
}

void RdmaChannel::post(std::span<const ReadOp> ops) {
  const size_t cap = fifo_.size();
  size_t n = 0;
  for (const ReadOp& op : ops) {
    if (!read_in_bounds(desc_.length, op.remote_offset, op.length)) {
      local_.push_back({op.cookie, Errc::kOutOfBounds});
      continue;
    }
    const uint32_t lkey = lkey_for(op.dst);
    if (dead_ != Errc::kOk || lkey == 0 || posted_ + n >= cap) {
      local_.push_back({op.cookie, dead_ != Errc::kOk ? dead_ : Errc::kInvalidArgument});
      continue;
    }
    fifo_[(fifo_head_ + posted_ + n) % cap] = {op, lkey, false};
    ++n;
  }
  if (n == 0) return;
  if (posted_ == 0) last_progress_ = last_completion_ = std::chrono::steady_clock::now();
  for (size_t i = 0; i < n; ++i) {
    // Signal the batch's last read, and one in every kSignalEvery.
    const bool signalled = i + 1 == n || ++unsignalled_ >= kSignalEvery;
    if (signalled) unsignalled_ = 0;
    fifo_[(fifo_head_ + posted_ + i) % cap].signalled = signalled;
  }
  size_t accepted = 0;
  const int rc = post_fifo(fifo_head_ + posted_, n, &accepted);
  posted_ += n;
  if (rc != 0) {
    // Only a prefix went out, and it may end unsignalled, so its completion
    // would never come: the queue pair is not to be trusted any more. A new
    // one takes every read.
    WaitResult failed;
    recover(Errc::kIo, std::string("ibv_post_send: ") + std::strerror(rc), failed);
    local_.insert(local_.end(), failed.completions.begin(), failed.completions.end());
  }
}

int RdmaChannel::post_fifo(uint64_t from, size_t n, size_t* accepted) {
  *accepted = 0;
  if (n == 0) return 0;
  const size_t cap = fifo_.size();
  for (size_t i = 0; i < n; ++i) {
    const Posted& p = fifo_[(from + i) % cap];
    sges_[i] = {reinterpret_cast<uint64_t>(p.op.dst), p.op.length, p.lkey};
    ibv_send_wr& wr = wrs_[i];
    wr = {};
    wr.wr_id = p.op.cookie;
    wr.sg_list = &sges_[i];
    wr.num_sge = 1;
    wr.opcode = IBV_WR_RDMA_READ;
    wr.send_flags = p.signalled ? IBV_SEND_SIGNALED : 0;
    wr.wr.rdma.remote_addr = desc_.remote_addr + p.op.remote_offset;
    wr.wr.rdma.rkey = desc_.key;
    if (i > 0) wrs_[i - 1].next = &wr;
  }
  ibv_send_wr* bad = nullptr;
  const int rc = ibv_post_send(conn_.id->qp, &wrs_[0], &bad);  // one doorbell for the batch
  if (rc == 0) {
    *accepted = n;
  } else {
    for (ibv_send_wr* w = &wrs_[0]; w != bad && w != nullptr; w = w->next) ++*accepted;
  }
  return rc;
}

void RdmaChannel::drain_cq(WaitResult& out) {
  ibv_wc wc[32];
  while (dead_ == Errc::kOk) {
    const int n = ibv_poll_cq(conn_.cq.get(), 32, wc);
    if (n < 0) {
      recover(Errc::kIo, "ibv_poll_cq failed", out);
      return;
    }
    for (int i = 0; i < n; ++i) {
      if (wc[i].status != IBV_WC_SUCCESS) {
        // The rest of wc[] is of the queue pair recover() destroys.
        recover(Errc::kIo, std::string("RDMA READ completed with ") + wc_status(wc[i].status), out);
        return;
      }
      // In-order completion: everything up to this signalled read is done.
      while (posted_ > 0) {
        const Posted& p = fifo_[fifo_head_ % fifo_.size()];
        ++fifo_head_;
        --posted_;
        out.completions.push_back({p.op.cookie, Errc::kOk});
        if (p.signalled) break;
      }
      last_progress_ = last_completion_ = std::chrono::steady_clock::now();
    }
    if (n < 32) return;
  }
}

void RdmaChannel::recover(Errc why, const std::string& text, WaitResult& out) {
  if (dead_ != Errc::kOk) return;
  spdlog::warn("rdma: {} ({} reads outstanding); reconnecting", text, posted_);
  teardown();
  std::string last_why = text;
  // A source that takes connections but never completes a read would have
  // us reconnect forever: past one request timeout plus one reconnect
  // timeout with reads out and none completed, it is dead.
  const bool stalled = posted_ > 0 &&
                       std::chrono::steady_clock::now() - last_completion_ >
                           std::chrono::milliseconds(options_.request_timeout_ms + options_.reconnect_timeout_ms);
  ReconnectEnd end = ReconnectEnd::kGaveUp;
  if (stalled) {
    last_why = "no read completed since the last reconnect";
  } else {
    // A connect attempt is bounded by its own setup timeout, not by the
    // time left: the stop is seen between attempts.
    end = reconnect(options_.reconnect_timeout_ms, watches_, &last_why,
                    [this](unsigned, std::string* why_not) { return try_reconnect(why_not); });
  }
  if (end == ReconnectEnd::kConnected) {
    ++reconnects_;
    last_progress_ = std::chrono::steady_clock::now();
    spdlog::info("rdma: reconnected; posted {} reads again", posted_);
    return;
  }
  if (end == ReconnectEnd::kStopped) {
    // The engine is going away: it reads no more from this channel.
    fail(Errc::kCancelled, text + "; stopped while reconnecting", out);
    watches_.report_stop(out.woken_tokens);
    return;
  }
  fail(why, text + "; reconnect failed: " + last_why, out);
}

ReconnectAttempt RdmaChannel::try_reconnect(std::string* why) {
  try {
    Connection c = connect_();
    if (c.reply.length != desc_.length || c.reply.page_size != desc_.page_size || c.reply.identity != desc_.identity) {
      *why = c.reply.identity != desc_.identity
                 ? "the source now serves other bytes as '" + desc_.name + "' (it was restarted)"
                 : "region '" + desc_.name + "' changed shape";
      conn_ = std::move(c);
      teardown();
      return ReconnectAttempt::kGiveUp;  // never read a different region into these pages
    }
    conn_ = std::move(c);
    desc_.key = conn_.reply.rkey;
    desc_.remote_addr = conn_.reply.remote_addr;
    if (conn_.depth < posted_) {
      *why = "the new queue pair is too small for the reads outstanding";
      teardown();
      return ReconnectAttempt::kGiveUp;
    }
    size_t accepted = 0;
    if (const int rc = post_fifo(fifo_head_, posted_, &accepted); rc != 0) {
      *why = std::string("ibv_post_send on the new queue pair: ") + std::strerror(rc);
      teardown();
      return ReconnectAttempt::kRetry;
    }
    return ReconnectAttempt::kConnected;
  } catch (const std::exception& e) {
    // Not found is tried again too: a restarted source listens a moment
    // before it exports its regions.
    *why = e.what();
    return ReconnectAttempt::kRetry;
  }
}

void RdmaChannel::fail(Errc why, const std::string& text, WaitResult& out) {
  if (dead_ != Errc::kOk) return;
  dead_ = why;
  dead_text_ = text;
  if (why == Errc::kCancelled) {
    spdlog::info("rdma: {} ({} reads outstanding)", text, posted_);
  } else {
    spdlog::error("rdma: {} ({} reads outstanding); this connection is dead", text, posted_);
  }
  teardown();  // no read lands in memory given back as failed
  for (; posted_ > 0; --posted_, ++fifo_head_) {
    out.completions.push_back({fifo_[fifo_head_ % fifo_.size()].op.cookie, why});
  }
}

void RdmaChannel::wait(WaitResult& out, int timeout_ms) {
  // Whatever completes here is reported at once, failed reads included: a
  // reconnect that fails in drain_cq fails every read outstanding, and a
  // blocking wait after it would sit on them until something else woke it.
  const size_t had = out.completions.size();
  out.completions.insert(out.completions.end(), local_.begin(), local_.end());
  local_.clear();
  take_refused_writes(out);
  drain_cq(out);
  if (out.completions.size() == had && timeout_ms != 0 && posted_ > 0 && dead_ == Errc::kOk) {
    // Arm, then look again: a completion between the two would be missed.
    ibv_req_notify_cq(conn_.cq.get(), 0);
    drain_cq(out);
  }
  if (out.completions.size() > had) timeout_ms = 0;
  int effective = timeout_ms;
  if (posted_ > 0 && dead_ == Errc::kOk) {
    const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                              last_progress_);
    const int left = static_cast<int>(std::max<int64_t>(options_.request_timeout_ms - waited.count(), 0));
    effective = effective < 0 ? left : std::min(effective, left);
  }
  // A dead channel has no queue pair left: it waits on the watches alone.
  const bool live = dead_ == Errc::kOk;
  pollfd own[2] = {{live ? conn_.comp->fd : -1, POLLIN, 0}, {live ? conn_.events->fd : -1, POLLIN, 0}};
  const int rc = watches_.poll(own, effective, out.woken_tokens);
  if (rc > 0) {
    if (own[0].revents != 0) {
      ibv_cq* cq = nullptr;
      void* ctx = nullptr;
      while (ibv_get_cq_event(conn_.comp.get(), &cq, &ctx) == 0) ++unacked_cq_events_;
      if (unacked_cq_events_ >= 64) {
        ibv_ack_cq_events(conn_.cq.get(), unacked_cq_events_);
        unacked_cq_events_ = 0;
      }
      drain_cq(out);  // may find the queue pair broken and replace it
    }
    // The cm events of the connection polled, if recovery has not replaced it.
    if (own[1].revents != 0 && dead_ == Errc::kOk && conn_.events && conn_.events->fd == own[1].fd) {
      rdma_cm_event* ev = nullptr;
      while (dead_ == Errc::kOk && rdma_get_cm_event(conn_.events.get(), &ev) == 0) {
        const rdma_cm_event_type type = ev->event;
        rdma_ack_cm_event(ev);
        if (type == RDMA_CM_EVENT_DISCONNECTED || type == RDMA_CM_EVENT_DEVICE_REMOVAL) {
          drain_cq(out);  // what completed before the peer left still counts
          recover(Errc::kClosed, std::string("the source ") + rdma_event_str(type), out);
          break;
        }
      }
    }
  }
  if (posted_ > 0 && dead_ == Errc::kOk &&
      std::chrono::steady_clock::now() - last_progress_ >= std::chrono::milliseconds(options_.request_timeout_ms)) {
    recover(Errc::kTimeout, "no RDMA completion within " + std::to_string(options_.request_timeout_ms) + " ms", out);
  }
  if (dead_ != Errc::kOk) {
    out.channel_error = dead_;
    out.channel_error_text = dead_text_;
  }
}

}  // namespace pagewire::rdma
