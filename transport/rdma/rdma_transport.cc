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
  if (name.empty() || name.size() > kMaxRdmaName) {
    throw Error(Errc::kBadUri, "an rdma:// region name must be 1.." + std::to_string(kMaxRdmaName) + " bytes");
  }
  if (!have_device()) {
    throw Error(Errc::kConnectFailed,
                "no RDMA device here (ibv_devices lists none): use tcp://, or run under tools/rxe-vm for Soft-RoCE");
  }
  RegionDescriptor granted;
  if (o.writer) {
    // The lease, and the node's pages never written, from a TCP handshake
    // that reserves the lease for this destination's write connection,
    // made at once: it holds the lease from then on, and lets it go with
    // this transport even if no write channel is ever opened.
    granted = ticket(setup_timeout(o), true);
    desc_.lease = granted.lease;
    write_first_ = std::make_unique<Connection>(connect_one(true, &granted));
  }
  first_ = std::make_unique<Connection>(connect_one(false));
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
  if (o.writer) {
    if (granted.identity != r.identity || granted.length != r.length) {
      throw Error(Errc::kProtocol, endpoint_.text + " answered over RDMA for another region than over TCP");
    }
    desc_.zero_map = std::move(granted.zero_map);
  } else {
    fetch_zero_map(*first_);
  }
  spdlog::info("rdma: attached '{}' at {} on {} port {}: {} bytes, {} B pages{}", name, endpoint_.text,
               ibv_get_device_name(first_->id->verbs->device), first_->id->port_num, desc_.length, desc_.page_size,
               o.writer ? ", as its writer" : "");
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
  write_first_.reset();
}

TransportCapabilities RdmaTransport::capabilities() const {
  const auto depth = std::min<uint32_t>(kMaxDepth, static_cast<uint32_t>(device_.max_qp_wr));
  return {depth, static_cast<uint32_t>(std::min<uint64_t>(device_.max_mr_size, 1u << 30))};
}

Connection RdmaTransport::connect_one(bool writer, const RegionDescriptor* ticketed) {
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
  const uint32_t acks = writer ? kWriteSlots : 0;  // a writer's receives
  const int cqe = std::min<int>(static_cast<int>(c.depth + acks) + 1, device_.max_cqe);
  ibv_cq* cq = ibv_create_cq(ctx, cqe, nullptr, comp, 0);
  if (cq == nullptr) throw_errno("ibv_create_cq");
  c.cq.reset(cq);
  ibv_qp_init_attr qa{};
  qa.send_cq = cq;
  qa.recv_cq = cq;
  qa.qp_type = IBV_QPT_RC;
  qa.cap.max_send_wr = c.depth;
  qa.cap.max_recv_wr = std::max(acks, 1u);
  qa.cap.max_send_sge = 2;  // a write's header and payload
  qa.cap.max_recv_sge = 1;
  qa.sq_sig_all = 0;
  if (rdma_create_qp(id.get(), pd_.get(), &qa) != 0) throw_errno("rdma_create_qp");
  c.depth = std::min(c.depth, qa.cap.max_send_wr);

  Hello hello{};
  hello.magic = kHelloMagic;
  hello.version = kRdmaVersion;
  hello.name_length = static_cast<uint8_t>(name_.size());
  RegionDescriptor proved;  // what the TCP handshake that proved the key (or presented the lease) said
  if (options_.key != nullptr || writer) {
    proved = ticketed != nullptr ? *ticketed : ticket(timeout, writer);
    hello.flags = static_cast<uint8_t>(kRdmaTicket | (writer ? kRdmaWriter : 0));
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
  if ((options_.key != nullptr || writer) && (c.reply.identity != proved.identity || c.reply.length != proved.length ||
                                              c.reply.page_size != proved.page_size)) {
    throw Error(Errc::kProtocol,
                endpoint_.text + " answered over RDMA for another region than the one it proved " + "over TCP");
  }
  c.id = std::move(id);
  if (writer) c.ring = make_write_ring(c);
  return c;
}

std::unique_ptr<WriteRing> RdmaTransport::make_write_ring(Connection& c) {
  const HelloReply& r = c.reply;
  if (r.write_slots == 0 || r.write_slots > kWriteSlots || r.write_slot_bytes <= kWriteHeaderBytes ||
      r.write_slot_bytes - kWriteHeaderBytes < std::min(r.page_size, kMaxWritePayload)) {
    throw Error(Errc::kProtocol, endpoint_.text + " granted a writer no usable staging ring");
  }
  auto ring = std::make_unique<WriteRing>();
  ring->remote_addr = r.write_ring_addr;
  ring->rkey = r.write_ring_rkey;
  ring->slots = r.write_slots;
  ring->slot_bytes = r.write_slot_bytes;
  ring->headers.resize(size_t{ring->slots} * kWriteHeaderBytes);
  ring->acks.resize(ring->slots);
  ring->headers_mr.reset(ibv_reg_mr(pd_.get(), ring->headers.data(), ring->headers.size(), 0));
  ring->acks_mr.reset(
      ibv_reg_mr(pd_.get(), ring->acks.data(), ring->acks.size() * sizeof(WriteAck), IBV_ACCESS_LOCAL_WRITE));
  if (!ring->headers_mr || !ring->acks_mr) throw_errno("ibv_reg_mr of a writer's headers and acks");
  // A receive for every slot's ack, before the first write can go out.
  for (uint32_t i = 0; i < ring->slots; ++i) {
    if (const int rc = post_ack_receive(c.id->qp, *ring, i); rc != 0) {
      throw Error(Errc::kIo, std::string("posting a writer's receives: ") + std::strerror(rc));
    }
  }
  return ring;
}

RegionDescriptor RdmaTransport::ticket(unsigned timeout_ms, bool writer) {
  // Proves the key over TCP (and has the server prove it back); the server
  // answers with a ticket good for one RDMA connect, within seconds.
  std::string why;
  UniqueFd fd = tcp::connect_to(endpoint_, timeout_ms, &why);
  if (!fd) throw Error(Errc::kConnectFailed, "asking for an RDMA ticket over TCP: " + why);
  // A writer takes the node's writer lease here (or presents the one it
  // holds), and the ticket names it.
  uint8_t flags = wire::kHelloTicket;
  if (writer) flags |= wire::kHelloWriter | (desc_.lease != 0 ? wire::kHelloLease : 0);
  RegionDescriptor d = tcp::handshake(fd.get(), name_, timeout_ms, endpoint_.text, flags, desc_.lease,
                                      options_.key.get());
  if (desc_.identity != 0 && d.identity != desc_.identity) {
    throw Error(Errc::kProtocol, "region '" + name_ + "' on " + endpoint_.text + " is not the one attached");
  }
  return d;
}

std::unique_ptr<Channel> RdmaTransport::open_channel(ChannelUse use) {
  // A writer's writes go on a connection of their own: only it reaches the
  // staging ring, and it reads nothing.
  const bool writer = use == ChannelUse::kWrite && options_.writer;
  std::unique_ptr<Connection>& made = writer ? write_first_ : first_;
  Connection c = made ? std::move(*made) : connect_one(writer);
  made.reset();
  if (c.reply.length != desc_.length || c.reply.page_size != desc_.page_size || c.reply.identity != desc_.identity) {
    throw Error(Errc::kProtocol, "region '" + name_ + "' changed on " + endpoint_.text + " while attaching");
  }
  RegionDescriptor d = desc_;
  d.key = c.reply.rkey;
  d.remote_addr = c.reply.remote_addr;
  if (!mrs_) mrs_ = std::make_shared<MrCache>(pd_.get());
  // Channels go before their transport, so the connector may hold it.
  return std::make_unique<RdmaChannel>(
      std::move(c), [this, writer] { return connect_one(writer); }, mrs_, d, options_);
}

}  // namespace pagewire::rdma
