#include "transport/rdma/rdma_server.h"

#include <arpa/inet.h>
#include <poll.h>
#include <sys/eventfd.h>

#include <cerrno>
#include <cstring>

#include "spdlog/spdlog.h"
#include "transport/endpoint.h"
#include "transport/export_table.h"

namespace pagewire::rdma {

RdmaServer::RdmaServer(const std::string& bind_address, uint16_t port, unsigned max_connections, TicketBook& tickets,
                       bool keyed)
    : max_connections_(max_connections), tickets_(tickets), keyed_(keyed) {
  if (!have_device()) throw Error(Errc::kConnectFailed, "no RDMA device");
  events_ = make_event_channel();
  rdma_cm_id* raw = nullptr;
  if (rdma_create_id(events_.get(), &raw, nullptr, RDMA_PS_TCP) != 0) throw_errno("rdma_create_id");
  listen_id_.reset(raw);
  Endpoint ep = resolve(bind_address, port);
  if (rdma_bind_addr(listen_id_.get(), reinterpret_cast<sockaddr*>(&ep.addr)) != 0) {
    throw_errno("rdma_bind_addr " + ep.text);
  }
  if (rdma_listen(listen_id_.get(), 64) != 0) throw_errno("rdma_listen " + ep.text);
  port_ = ntohs(rdma_get_src_port(listen_id_.get()));
  // One PD per device librdmacm may hand us connections on.
  int n = 0;
  ibv_context** contexts = rdma_get_devices(&n);
  for (int i = 0; contexts != nullptr && i < n; ++i) {
    ibv_pd* pd = ibv_alloc_pd(contexts[i]);
    if (pd == nullptr) throw_errno("ibv_alloc_pd");
    devices_.push_back({contexts[i], Pd(pd)});
  }
  if (contexts != nullptr) rdma_free_devices(contexts);
  stop_fd_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  drop_fd_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop_fd_ || !drop_fd_) throw_errno("eventfd");
  thread_ = std::thread([this] { run(); });
  spdlog::info("server: RDMA listening on {}:{} ({} device(s))", bind_address, port_, devices_.size());
}

RdmaServer::~RdmaServer() { stop(); }

void RdmaServer::register_everywhere(Registered& r) {
  for (Device& d : devices_) {
    if (r.mrs.count(d.context) != 0) continue;
    // Remote read only: file-backed regions are mapped read-only.
    ibv_mr* mr = ibv_reg_mr(d.pd.get(), const_cast<std::byte*>(r.region->base), r.region->length,
                            IBV_ACCESS_REMOTE_READ);
    if (mr == nullptr) {
      throw_errno("ibv_reg_mr of region '" + r.region->name + "' on " + ibv_get_device_name(d.context->device));
    }
    r.mrs.emplace(d.context, Mr(mr));
    if (!r.region->zero_map.empty()) {
      // Updated in place by mark_changed(), never reallocated.
      ibv_mr* zmr = ibv_reg_mr(d.pd.get(), const_cast<uint64_t*>(r.region->zero_map.data()),
                               r.region->zero_map.size() * 8, IBV_ACCESS_REMOTE_READ);
      if (zmr == nullptr) throw_errno("ibv_reg_mr of the zero-page map of '" + r.region->name + "'");
      r.zero_mrs.emplace(d.context, Mr(zmr));
    }
  }
}

void RdmaServer::add(const ExportedRegion& region) {
  std::lock_guard lock(mu_);
  Registered& r = regions_[region.name];
  r.region = &region;
  try {
    register_everywhere(r);
  } catch (...) {
    regions_.erase(region.name);  // no half-registered entry for peers to find
    throw;
  }
}

void RdmaServer::remove(const std::string& name) {
  std::lock_guard lock(mu_);
  regions_.erase(name);
}

void RdmaServer::drop_connections() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(drop_fd_.get(), &one, sizeof one);
}

void RdmaServer::stop() {
  if (stopped_) return;
  stopped_ = true;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(stop_fd_.get(), &one, sizeof one);
  if (thread_.joinable()) thread_.join();
  for (auto& [id, peer] : peers_) rdma_disconnect(id);
  peers_.clear();
  {
    std::lock_guard lock(mu_);
    regions_.clear();  // MRs before PDs
  }
  devices_.clear();
  listen_id_.reset();
}

void RdmaServer::on_connect_request(rdma_cm_event* ev) {
  rdma_cm_id* id = ev->id;
  HelloReply reply{};
  reply.magic = kHelloMagic;
  reply.status = static_cast<uint32_t>(Errc::kOk);
  Hello hello{};
  const bool well_formed = ev->param.conn.private_data != nullptr && ev->param.conn.private_data_len >= sizeof hello &&
                           (std::memcpy(&hello, ev->param.conn.private_data, sizeof hello), true) &&
                           hello.magic == kHelloMagic && hello.name_length > 0 && hello.name_length <= kMaxRdmaName;
  // The CM reports the request from our side: its responder_resources is
  // the reads the peer wants to have outstanding against us.
  const uint8_t peer_reads = ev->param.conn.responder_resources;
  rdma_ack_cm_event(ev);
  auto refuse = [&](Errc why) {
    reply.status = static_cast<uint32_t>(why);
    rdma_reject(id, &reply, sizeof reply);
    rdma_destroy_id(id);
  };
  if (!well_formed) {
    spdlog::warn("server: RDMA connect request without a pagewire hello; rejected");
    return refuse(Errc::kProtocol);
  }
  if (hello.version != kRdmaVersion) {
    spdlog::warn("server: RDMA peer speaks protocol version {}, this server {}; rejected", hello.version, kRdmaVersion);
    return refuse(Errc::kProtocol);
  }
  const std::string name(hello.name, hello.name_length);
  const bool writer = (hello.flags & kRdmaWriter) != 0;
  // Nothing about the region, not even whether it exists, to a peer that
  // has not proved the key over TCP. A writer's ticket also names its lease.
  uint64_t lease = 0;
  if ((keyed_ || writer) && ((hello.flags & kRdmaTicket) == 0 || !tickets_.redeem(hello.ticket, name, &lease))) {
    spdlog::warn("server: RDMA {} for '{}' brought {}; rejected", writer ? "writer" : "peer", name,
                 (hello.flags & kRdmaTicket) == 0 ? (writer ? "no ticket (a writer gets one over TCP with its lease)"
                                                            : "no ticket (this server asks for a key)")
                                                  : "a ticket this server did not issue, or used or expired");
    return refuse(Errc::kAuth);
  }
  // (After the ticket, which is used up either way: a connect refused as
  // busy leaves no ticket behind for someone else to use.)
  if (active_.load() >= max_connections_) {
    spdlog::warn("server: refusing an RDMA peer: {} connections open already", max_connections_);
    return refuse(Errc::kBusy);
  }
  const ExportedRegion* region = nullptr;
  uint32_t rkey = 0;
  {
    std::lock_guard lock(mu_);
    auto it = regions_.find(name);
    if (it != regions_.end()) {
      auto mr = it->second.mrs.find(id->verbs);
      if (mr != it->second.mrs.end()) {
        region = it->second.region;
        rkey = mr->second->rkey;
      }
      auto zmr = it->second.zero_mrs.find(id->verbs);
      if (zmr != it->second.zero_mrs.end()) {
        reply.zero_map_addr = reinterpret_cast<uint64_t>(zmr->second->addr);
        reply.zero_map_rkey = zmr->second->rkey;
        reply.zero_map_bytes = static_cast<uint32_t>(zmr->second->length);
      }
    }
  }
  if (region == nullptr) {
    spdlog::info("server: RDMA peer asked for unknown region '{}'", name);
    return refuse(Errc::kNotFound);
  }
  ibv_pd* pd = nullptr;
  for (Device& d : devices_) {
    if (d.context == id->verbs) pd = d.pd.get();
  }
  ibv_device_attr attr{};
  ibv_query_device(id->verbs, &attr);
  Peer peer;
  if (pd == nullptr) {
    spdlog::error("server: an RDMA peer came through a device this server did not open");
    return refuse(Errc::kIo);
  }
  if (writer) {
    if (const Errc why = admit_writer(*region, lease, id, peer); why != Errc::kOk) return refuse(why);
    pd = peer.writer->pd();
  }
  // The passive side only answers reads, and a writer's acks.
  ibv_cq* cq = ibv_create_cq(id->verbs, peer.writer ? peer.writer->cq_entries() : 2, nullptr,
                             peer.writer ? peer.writer->channel() : nullptr, 0);
  ibv_qp_init_attr qa{};
  qa.send_cq = cq;
  qa.recv_cq = cq;
  qa.qp_type = IBV_QPT_RC;
  qa.cap.max_send_wr = peer.writer ? peer.writer->send_depth() : 1;
  qa.cap.max_recv_wr = peer.writer ? peer.writer->recv_depth() : 1;
  qa.cap.max_send_sge = 1;
  qa.cap.max_recv_sge = 1;
  if (cq == nullptr || pd == nullptr || rdma_create_qp(id, pd, &qa) != 0) {
    spdlog::error("server: cannot set up an RDMA queue pair: {}", std::strerror(errno));
    if (cq != nullptr) ibv_destroy_cq(cq);
    return refuse(Errc::kIo);
  }
  if (peer.writer && !peer.writer->start(id->qp, cq)) {
    spdlog::error("server: cannot post a writer's receives: {}", std::strerror(errno));
    rdma_destroy_qp(id);
    ibv_destroy_cq(cq);
    return refuse(Errc::kIo);
  }
  peer.cq.reset(cq);
  peer.id.reset(id);
  reply.rkey = rkey;
  reply.page_size = region->page_size;
  reply.length = region->length;
  reply.remote_addr = reinterpret_cast<uint64_t>(region->base);
  reply.identity = region->identity;
  if (peer.writer) {
    // The writer's queue pair reaches its staging ring alone, not the region.
    reply.rkey = 0;
    reply.remote_addr = 0;
    peer.writer->describe(reply);
  }
  rdma_conn_param param{};
  param.private_data = &reply;
  param.private_data_len = sizeof reply;
  // Reads the peer may have outstanding against us, within our limit.
  param.responder_resources = static_cast<uint8_t>(std::min<int>(peer_reads, attr.max_qp_rd_atom));
  param.initiator_depth = 0;
  // A writer that stops posting receives for its acks is dropped rather
  // than retried for ever.
  param.rnr_retry_count = peer.writer ? 6 : 7;
  if (rdma_accept(id, &param) != 0) {
    spdlog::error("server: rdma_accept: {}", std::strerror(errno));
    return;  // peer (and id) destroyed as it goes out of scope
  }
  ++accepted_;
  ++active_;
  peers_.emplace(id, std::move(peer));
  spdlog::debug("server: RDMA peer attached '{}'{}", name, writer ? " (writer)" : "");
}

Errc RdmaServer::admit_writer(const ExportedRegion& region, uint64_t lease, rdma_cm_id* id, Peer& peer) {
  if (region.writable_base == nullptr) {
    spdlog::warn("server: an RDMA peer asked to write '{}', which is read-only (only memory nodes take writes); "
                 "rejected",
                 region.name);
    return Errc::kUnsupported;
  }
  if (lease == 0 || region.lease.acquire(lease) == 0) {
    spdlog::warn("server: an RDMA peer asked to write '{}' without its writer lease (its ticket was a reader's, or "
                 "another writer came since); rejected",
                 region.name);
    return Errc::kLeased;
  }
  try {
    peer.writer = std::make_unique<NodeWriter>(id->verbs, region, writes_applied_);  // holds the lease now
  } catch (const std::exception& e) {
    region.lease.release();
    spdlog::error("server: cannot set up a staging ring for a writer of '{}': {}", region.name, e.what());
    return Errc::kIo;
  }
  return Errc::kOk;
}

void RdmaServer::drop_peer(rdma_cm_id* id) {
  if (peers_.erase(id) > 0) --active_;
}

void RdmaServer::run() {
  std::vector<pollfd> fds;
  std::vector<rdma_cm_id*> writers;  // fds[3 + i] is writers[i]'s completion channel
  for (;;) {
    fds.assign({{events_->fd, POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}, {drop_fd_.get(), POLLIN, 0}});
    writers.clear();
    for (auto& [id, peer] : peers_) {
      if (!peer.writer) continue;
      fds.push_back({peer.writer->channel()->fd, POLLIN, 0});
      writers.push_back(id);
    }
    if (::poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) return;
    if (fds[1].revents != 0) return;
    if (fds[2].revents != 0) {
      uint64_t v;
      [[maybe_unused]] ssize_t r = ::read(drop_fd_.get(), &v, sizeof v);
      for (auto& [id, peer] : peers_) rdma_disconnect(id);
    }
    for (size_t i = 0; i < writers.size(); ++i) {
      if (fds[3 + i].revents == 0) continue;
      auto it = peers_.find(writers[i]);
      if (it != peers_.end() && !it->second.writer->on_completions()) rdma_disconnect(it->first);
    }
    rdma_cm_event* ev = nullptr;
    while (rdma_get_cm_event(events_.get(), &ev) == 0) {
      switch (ev->event) {
        case RDMA_CM_EVENT_CONNECT_REQUEST:
          on_connect_request(ev);  // acks the event
          break;
        case RDMA_CM_EVENT_DISCONNECTED:
        case RDMA_CM_EVENT_REJECTED:
        case RDMA_CM_EVENT_CONNECT_ERROR:
        case RDMA_CM_EVENT_UNREACHABLE:
        case RDMA_CM_EVENT_DEVICE_REMOVAL: {
          rdma_cm_id* id = ev->id;
          rdma_ack_cm_event(ev);  // before destroying the id, which waits for acks
          drop_peer(id);
          break;
        }
        default: rdma_ack_cm_event(ev); break;
      }
    }
  }
}

}  // namespace pagewire::rdma
