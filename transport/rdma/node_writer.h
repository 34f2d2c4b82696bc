// The server's side of one RDMA connection that writes a memory node (see
// WriteHeader in verbs.h): a protection domain of the connection's own,
// holding its queue pair and nothing but the writer's staging ring
// (registered for remote write) and its acks, so that no other queue pair
// can use the ring's rkey, and this one reaches nothing else; the receives
// its writes complete into; and the copy of each whole write into the
// region, with its acknowledgement. A registration per writer rather than
// a memory window: windows (type 2) are an optional device capability, and
// the ring, small and the writer's own, is what must be remotely writable,
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
  NodeWriter(ibv_context* context, const ExportedRegion& region, std::atomic<uint64_t>& applied);
  NodeWriter(const NodeWriter&) = delete;
  NodeWriter& operator=(const NodeWriter&) = delete;
  ~NodeWriter();

  // The connection's queue pair goes in this protection domain, and its
  // completion queue on this channel, sized by cq_entries().
  ibv_pd* pd() const { return pd_.get(); }
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
  bool drain();
  bool apply_and_ack(uint32_t slot);
  Errc apply(uint32_t slot);
  bool post_recv(uint32_t slot);
  bool send_ack(uint32_t slot, Errc status);

  const ExportedRegion& region_;
  std::atomic<uint64_t>& applied_;
  uint32_t slots_ = kWriteSlots;
  uint32_t slot_bytes_;
  Pd pd_;  // last of the verbs objects to go
  CompChannel comp_;
  Mapping ring_;
  std::vector<WriteAck> acks_;  // one per slot, sent from here
  Mr ring_mr_;
  Mr acks_mr_;
  ibv_qp* qp_ = nullptr;
  ibv_cq* cq_ = nullptr;
  uint32_t sends_out_ = 0;
  std::deque<uint32_t> unsent_acks_;  // waiting for room in the send queue
  // A slot acked but whose ack has not gone out: a write into it now is
  // the writer's mistake (it reuses slots only once acked), and bounds
  // unsent_acks_ by the slots.
  std::vector<bool> ack_pending_;
  bool broken_ = false;  // once the queue pair failed, nothing more is applied
};

}  // namespace rdma
}  // namespace pagewire
