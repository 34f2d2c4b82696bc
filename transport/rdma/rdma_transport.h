// The RDMA verbs transport: librdmacm to address and connect, one RC queue
// pair and completion queue per handler thread (rdma_channel.h), and RDMA
// READ straight into registered staging memory. A memory node's writer
// takes its lease over TCP and then connects with a ticket that names it;
// its writes go by RDMA WRITE into a staging ring of its own on the node.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "transport/endpoint.h"
#include "transport/rdma/rdma_channel.h"
#include "transport/rdma/verbs.h"
#include "transport/reconnect.h"
#include "transport/transport.h"

namespace pagewire::rdma {

class RdmaTransport final : public Transport {
 public:
  // Connects (throws pagewire::Error with what went wrong: no device, port
  // down, no route, rejected, no answer, unknown region).
  RdmaTransport(const std::string& host, uint16_t port, const std::string& name, const TransportOptions& o);
  ~RdmaTransport() override;

  std::string_view name() const override { return "rdma"; }
  const RegionDescriptor& region() const override { return desc_; }
  TransportCapabilities capabilities() const override;
  // RDMA reads take no CPU on the source: demand and bulk are alike there.
  std::unique_ptr<Channel> open_channel(ChannelUse use = ChannelUse::kDemand) override;
  // Over TCP to the same server and port; the pages still move by RDMA READ.
  std::unique_ptr<SourceControl> open_control() override;

 private:
  // One connection to the region: a reader's, or the writer's (its ticket
  // presents the lease, and the node grants it a staging ring).
  // `ticketed`: the ticket got already, with what its handshake said.
  Connection connect_one(bool writer, const RegionDescriptor* ticketed = nullptr);
  // A writer's end of the staging ring the node granted on `c`.
  std::unique_ptr<WriteRing> make_write_ring(Connection& c);
  // With a key, or to write: proves the key (takes or presents the writer
  // lease) over TCP and returns the region as the server described it
  // there, with its ticket for one RDMA connect (transport/tickets.h).
  // `writer`: takes the lease, or presents desc_.lease, and the ticket
  // names it.
  RegionDescriptor ticket(unsigned timeout_ms, bool writer);
  // One RDMA READ of the server's zero-page bitmap into desc_.zero_map.
  void fetch_zero_map(Connection& c);

  Endpoint endpoint_;
  std::string name_;
  TransportOptions options_;
  RegionDescriptor desc_;
  ibv_device_attr device_{};
  Pd pd_;  // one per device; every channel's QP and MRs live in it
  std::shared_ptr<MrCache> mrs_;
  std::unique_ptr<Connection> first_;        // handed to the first channel
  std::unique_ptr<Connection> write_first_;  // a writer's, to its first write channel
};

}  // namespace pagewire::rdma
