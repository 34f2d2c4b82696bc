// The RDMA side of the memory server. Each exported region is registered
// once per RDMA device (remote read only); a destination's connect request
// names the region, and the accept carries its address, rkey and shape.
// After that the server's CPU takes no part in reads: they are one-sided.
// A memory node's writer gets a staging ring of its own instead, and this
// server's event thread copies each write that arrives there into the
// region (node_writer.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/unique_fd.h"
#include "pagewire/server.h"
#include "transport/rdma/node_writer.h"
#include "transport/rdma/verbs.h"
#include "transport/tickets.h"

namespace pagewire {

struct ExportedRegion;

namespace rdma {

class RdmaServer {
 public:
  // Listens on bind_address:port in the RDMA port space; throws when no
  // RDMA device can listen there.
  // At most `max_connections` destinations at once; more are rejected
  // with Errc::kBusy. `tickets` are issued over TCP (transport/tickets.h):
  // a writer's connect request must carry one, and so must every request
  // to a `keyed` server, or it is rejected with Errc::kAuth before anything
  // of the region is sent.
  RdmaServer(const std::string& bind_address, uint16_t port, unsigned max_connections, TicketBook& tickets, bool keyed);
  RdmaServer(const RdmaServer&) = delete;
  RdmaServer& operator=(const RdmaServer&) = delete;
  ~RdmaServer();

  void add(const ExportedRegion& region);
  // Takes a region added a moment ago out again (its export failed after
  // the registration); peers that read it since see their reads fail.
  void remove(const std::string& name);
  uint16_t port() const { return port_; }
  uint64_t connections_accepted() const { return accepted_.load(); }
  uint64_t connections_active() const { return active_.load(); }
  uint64_t writes_applied() const { return writes_applied_.load(); }
  void drop_connections();
  void stop();

 private:
  struct Device {
    ibv_context* context;
    Pd pd;
  };
  struct Registered {
    const ExportedRegion* region;
    std::map<ibv_context*, Mr> mrs;       // one per device
    std::map<ibv_context*, Mr> zero_mrs;  // the zero-page bitmap, per device
  };
  struct Peer {
    std::unique_ptr<NodeWriter> writer;  // a node's writer; goes after its QP and CQ
    Cq cq;
    CmId id;  // with its QP; destroyed before the CQ
  };

  void run();
  void on_connect_request(rdma_cm_event* ev);
  // Admits a writer (Hello kRdmaWriter) of `region` holding `lease`:
  // Errc::kOk with peer.writer set up, or why not.
  Errc admit_writer(const ExportedRegion& region, uint64_t lease, rdma_cm_id* id, Peer& peer);
  void drop_peer(rdma_cm_id* id);
  void register_everywhere(Registered& r);

  EventChannel events_;
  CmId listen_id_;
  UniqueFd stop_fd_;
  UniqueFd drop_fd_;
  uint16_t port_ = 0;

  std::mutex mu_;  // guards regions_ against add() from other threads
  std::vector<Device> devices_;
  std::unordered_map<std::string, Registered> regions_;
  std::map<rdma_cm_id*, Peer> peers_;  // event thread only
  std::atomic<uint64_t> accepted_{0};
  std::atomic<uint64_t> active_{0};
  std::atomic<uint64_t> writes_applied_{0};
  unsigned max_connections_;
  TicketBook& tickets_;
  bool keyed_;
  bool stopped_ = false;
  std::thread thread_;  // last: starts once the rest exists
};

}  // namespace rdma
}  // namespace pagewire
