// The RDMA verbs transport: librdmacm to address and connect, one RC queue
// pair and completion queue per handler thread, and RDMA READ straight into
// registered staging memory. Posting is per batch (one doorbell), with
// selective signalling: RC completes work requests in order, so one
// signalled completion retires every unsignalled read posted before it.
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
#include "transport/rdma/verbs.h"
#include "transport/reconnect.h"
#include "transport/transport.h"

namespace pagewire::rdma {

// One connected queue pair. Members in teardown order (last destroyed
// first): the cm id with its QP goes before the CQ, the CQ before its
// completion channel, and all before the event channel.
struct Connection {
  EventChannel events;
  CompChannel comp;
  Cq cq;
  CmId id;
  HelloReply reply{};
  uint32_t depth = 0;  // send queue entries
};

// Memory registrations shared by the channels of one transport: a buffer
// every channel reads into (a shared-memory region's alias) is registered,
// and pinned, once rather than once per channel. Deregistered when the last
// channel holding it goes.
class MrCache {
 public:
  explicit MrCache(ibv_pd* pd) : pd_(pd) {}
  std::shared_ptr<ibv_mr> get(std::byte* base, size_t length);

 private:
  ibv_pd* pd_;
  std::mutex mu_;
  std::vector<std::weak_ptr<ibv_mr>> mrs_;
};

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
  Connection connect_one();
  // With a key: proves it over TCP and returns the region as the server
  // described it there, with its ticket for one RDMA connect
  // (transport/tickets.h).
  RegionDescriptor ticket(unsigned timeout_ms);
  // One RDMA READ of the server's zero-page bitmap into desc_.zero_map.
  void fetch_zero_map(Connection& c);

  Endpoint endpoint_;
  std::string name_;
  TransportOptions options_;
  RegionDescriptor desc_;
  ibv_device_attr device_{};
  Pd pd_;  // one per device; every channel's QP and MRs live in it
  std::shared_ptr<MrCache> mrs_;
  std::unique_ptr<Connection> first_;  // handed to the first channel
};

class RdmaChannel final : public Channel {
 public:
  // `connect` makes a new connection to the same source, for the channel to
  // go on with when its queue pair breaks.
  using Connector = std::function<Connection()>;
  RdmaChannel(Connection conn, Connector connect, std::shared_ptr<MrCache> mrs, RegionDescriptor desc,
              TransportOptions options);
  ~RdmaChannel() override;

  LocalBuffer register_buffer(std::byte* base, size_t length) override;
  void post(std::span<const ReadOp> ops) override;
  void wait(WaitResult& out, int timeout_ms) override;
  uint64_t reconnects() const override { return reconnects_; }

  // Every this many unsignalled reads, one is signalled anyway so the send
  // queue is retired before it fills.
  static constexpr uint32_t kSignalEvery = 16;

 private:
  // A posted read, kept whole so that it can be posted again on a new
  // queue pair.
  struct Posted {
    ReadOp op;
    uint32_t lkey;
    bool signalled;
  };

  uint32_t lkey_for(const std::byte* p) const;
  void drain_cq(WaitResult& out);
  // Posts fifo entries [from, from + n) as one chain; 0 or the errno of
  // ibv_post_send, with *accepted the reads that went out.
  int post_fifo(uint64_t from, size_t n, size_t* accepted);
  // The queue pair broke: destroy it (no read lands after that), connect
  // again within reconnect_timeout_ms and post every outstanding read anew;
  // failing that, the channel is dead and they fail with `why` (with
  // kCancelled when the stop descriptor fired first).
  void recover(Errc why, const std::string& text, WaitResult& out);
  // One reconnect attempt: a new queue pair to the same region, with every
  // outstanding read posted on it.
  ReconnectAttempt try_reconnect(std::string* why);
  void teardown();
  void fail(Errc why, const std::string& text, WaitResult& out);

  Connector connect_;
  std::shared_ptr<MrCache> cache_;
  RegionDescriptor desc_;
  TransportOptions options_;
  std::vector<std::shared_ptr<ibv_mr>> mrs_;  // declared before conn_: the QP stops before they go
  Connection conn_;

  std::vector<Posted> fifo_;  // ring of posted reads, in posting order
  uint64_t fifo_head_ = 0;
  uint64_t posted_ = 0;
  uint32_t unsignalled_ = 0;
  std::vector<ibv_send_wr> wrs_;
  std::vector<ibv_sge> sges_;
  std::vector<ReadCompletion> local_;
  unsigned unacked_cq_events_ = 0;
  Errc dead_ = Errc::kOk;
  std::string dead_text_;
  std::chrono::steady_clock::time_point last_progress_{};
  // Moved by a completion, or by reads going out to an idle channel; never
  // by a reconnect.
  std::chrono::steady_clock::time_point last_completion_{};
  std::atomic<uint64_t> reconnects_{0};  // read by stats() from other threads
};

}  // namespace pagewire::rdma
