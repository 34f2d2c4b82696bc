// The server's side of one RDMA connection that writes a memory node (see
// WriteHeader in verbs.h): the writer's staging ring, registered for remote
// write on this connection's protection domain alone, so that no other
// connection holds an rkey that reaches it; the receives its writes
// complete into; and the copy of each whole write into the region, with
// its acknowledgement. One registration per writer rather than a memory
// window: windows (type 2) are an optional device capability, and the
// ring, small and the writer's own, is what must be remotely writable,
// never the region. Used by the server's event thread only.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <vector>

#include "common/unique_fd.h"
#include "transport/rdma/verbs.h"

namespace pagewire {

struct ExportedRegion;

namespace rdma {

class NodeWriter {
 public:
  // For a connection already admitted as `region`'s writer: holds one
  // count of its lease (WriterLease::acquire) and releases it when it goes.
  // Throws when the ring cannot be set up.
  NodeWriter(ibv_context* context, ibv_pd* pd, const ExportedRegion& region, std::atomic<uint64_t>& applied);
  NodeWriter(const NodeWriter&) = delete;
  NodeWriter& operator=(const NodeWriter&) = delete;
  ~NodeWriter();

  // The connection's completion queue is created on this channel, and sized
  // by cq_entries().
  ibv_comp_channel* channel() const { return comp_.get(); }
  int cq_entries() const { return static_cast<int>(3 * slots_ + 1); }
  uint32_t send_depth() const { return 2 * slots_; }
  uint32_t recv_depth() const { return slots_; }
  // What the accept tells the writer.
  void describe(HelloReply& reply) const;
  // Once the queue pair exists: posts a receive per slot and arms the CQ.
  // False when it cannot.
  bool start(ibv_qp* qp, ibv_cq* cq);
  // The completion channel fired: applies every write that arrived and
  // acknowledges it. False when the queue pair broke (the server then
  // drops the connection; a write whose ack was not sent may or may not be
  // in the region, whole either way).
  bool on_completions();

 private:
  bool apply_and_ack(uint32_t slot);
  Errc apply(uint32_t slot);
  bool post_recv(uint32_t slot);
  bool send_ack(uint32_t slot, Errc status);

  const ExportedRegion& region_;
  std::atomic<uint64_t>& applied_;
  uint32_t slots_ = kWriteSlots;
  uint32_t slot_bytes_;
  CompChannel comp_;
  Mapping ring_;
  std::vector<WriteAck> acks_;  // one per slot, sent from here
  Mr ring_mr_;
  Mr acks_mr_;
  ibv_qp* qp_ = nullptr;
  ibv_cq* cq_ = nullptr;
  uint32_t sends_out_ = 0;
  std::deque<uint32_t> unsent_acks_;  // waiting for room in the send queue
};

}  // namespace rdma
}  // namespace pagewire
