// One handler thread's RDMA channel: a connected RC queue pair with its
// completion queue, the reads posted on it (kept whole, to be posted again
// on a new queue pair after a reconnect) and, on a memory node's writer,
// the writes it has out in the node's staging ring (WriteHeader, verbs.h).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "transport/rdma/verbs.h"
#include "transport/reconnect.h"
#include "transport/transport.h"

namespace pagewire::rdma {

// One connected queue pair. Members in teardown order (last destroyed
// first): the cm id with its QP goes before the CQ, the CQ before its
// completion channel, and all before the event channel.
// A writer's end of its staging ring on a memory node: the headers that go
// out ahead of each write's payload and the buffers the node's acks land
// in, one per slot, registered in the connection's protection domain.
struct WriteRing {
  std::vector<std::byte> headers;  // kWriteHeaderBytes per slot
  std::vector<WriteAck> acks;
  Mr headers_mr;
  Mr acks_mr;
  uint64_t remote_addr = 0;  // the ring on the node, from the accept
  uint32_t rkey = 0;
  uint32_t slots = 0;
  uint32_t slot_bytes = 0;
};

// Posts the receive that ring.acks[index] takes the node's next ack into;
// 0 or the errno of ibv_post_recv.
int post_ack_receive(ibv_qp* qp, WriteRing& ring, uint32_t index);

struct Connection {
  EventChannel events;
  std::unique_ptr<WriteRing> ring;  // a writer's; goes after the QP
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
  // On a writer's connection, at most one page (and 64 KiB) per write;
  // writes beyond the free staging slots wait in the channel for one.
  void post_writes(std::span<const WriteOp> ops) override;
  void wait(WaitResult& out, int timeout_ms) override;
  uint64_t reconnects() const override { return reconnects_; }

  // Every this many unsignalled reads, one is signalled anyway so the send
  // queue is retired before it fills.
  static constexpr uint32_t kSignalEvery = 16;

 private:
  // A posted read, kept whole so that it can be posted again on a new
  // queue pair; or a write's work request, naming its staging slot.
  struct Posted {
    ReadOp op;
    uint32_t lkey;
    bool signalled;
    int32_t slot = -1;  // a write's; -1 for a read
  };
  // A write in a staging slot of the node's, out until the node acks it.
  struct SlotWrite {
    WriteOp op;
    uint32_t lkey = 0;
    uint64_t seq = 0;  // posting order, kept across a reconnect
    bool busy = false;
  };

  uint32_t lkey_for(const std::byte* p) const;
  bool busy() const { return posted_ > 0 || writes_out_ > 0 || !backlog_.empty(); }
  // Signals and posts the n fifo entries after the posted ones.
  void submit(size_t n);
  // Moves waiting writes into free staging slots.
  void post_backlog();
  // The node acknowledged a write: receive buffer `index` holds the ack.
  void on_ack(uint64_t index, WaitResult& out);
  void drain_cq(WaitResult& out);
  // Reports the requests that completed without going out (refused, or
  // failed when the channel died).
  void take_local(WaitResult& out);
  // Posts fifo entries [from, from + n) as one chain; 0 or the errno of
  // ibv_post_send, with *accepted the reads that went out.
  int post_fifo(uint64_t from, size_t n, size_t* accepted);
  // The queue pair broke: destroy it (no read lands after that), connect
  // again within reconnect_timeout_ms and post every outstanding read anew;
  // failing that, the channel is dead and they fail with `why` (with
  // kCancelled when the stop descriptor fired first).
  void recover(Errc why, const std::string& text, WaitResult& out);
  // Lays the fifo out afresh for a new queue pair: the reads outstanding,
  // then the writes not acked. Returns how many (more than the fifo holds:
  // nothing was changed).
  size_t requeue_for_new_queue_pair();
  // One reconnect attempt: a new queue pair to the same region, with every
  // outstanding read and write posted on it.
  ReconnectAttempt try_reconnect(std::string* why);
  void teardown();
  void fail(Errc why, const std::string& text, WaitResult& out);

  Connector connect_;
  std::shared_ptr<MrCache> cache_;
  RegionDescriptor desc_;
  TransportOptions options_;
  std::vector<std::shared_ptr<ibv_mr>> mrs_;  // declared before conn_: the QP stops before they go
  Connection conn_;

  std::vector<Posted> fifo_;    // ring of posted work requests, in posting order
  bool writer_ = false;         // holds the node's writer lease
  uint32_t write_payload_ = 0;  // the most one write carries
  uint64_t generation_ = 0;     // of the queue pair: moves when it is torn down
  std::vector<SlotWrite> slots_;
  std::vector<uint32_t> free_slots_;
  std::deque<WriteOp> backlog_;  // writes waiting for a free slot
  uint32_t writes_out_ = 0;
  uint64_t write_seq_ = 0;
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
